"""Config files, CLI overrides and validation (SPEC section 1 incompatibilities)."""

from pathlib import Path

import pytest

from domain_sae import config as C
from domain_sae.cli import build_parser

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", [p for p in CONFIGS if not p.name.startswith("study_")], ids=lambda p: p.name)
def test_shipped_train_configs_are_valid(path):
    cfg = C.build_config(C.TrainConfig, config_file=str(path))
    assert cfg.total_steps >= 1


def test_seed_lmsys_config_matches_the_seed_study():
    cfg = C.build_config(C.TrainConfig, config_file=str(Path(__file__).parents[1] / "configs/seed_lmsys_qwen.yaml"))
    assert (cfg.model, cfg.hook, cfg.context_size, cfg.expansion_factor) == (
        "Qwen/Qwen1.5-0.5B-Chat", "blocks.0.hook_mlp_out", 2048, 32)
    assert cfg.total_steps == 100_000 and cfg.lr == 5e-5 and cfg.l1_coefficient == 5
    assert cfg.lr_decay_steps == cfg.total_steps // 5 and cfg.l1_warm_up_steps == cfg.total_steps // 20


def test_cli_overrides_beat_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.01\nl1_coefficient: 2\n")
    cfg = C.build_config(C.TrainConfig, config_file=str(f), overrides={"lr": "3e-4"})
    assert cfg.lr == 3e-4 and cfg.l1_coefficient == 2


def test_toml_and_saelens_aliases(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('hook_name = "blocks.1.hook_resid_post"\nmodel_name = "gpt2"\ntraining_tokens = 8192\n')
    cfg = C.build_config(C.TrainConfig, config_file=str(f))
    assert cfg.hook == "blocks.1.hook_resid_post" and cfg.model == "gpt2"


def test_unknown_option_suggests_fix(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("l1_coeficient: 5\n")
    with pytest.raises(C.ConfigError, match="Unknown option 'l1_coeficient'.*l1_coefficient"):
        C.build_config(C.TrainConfig, config_file=str(f))


@pytest.mark.parametrize("key,value", [("lr", "fast"), ("context_size", "1.5"), ("wandb", "maybe"),
                                       ("lr_scheduler_name", "linear")])
def test_wrong_types_are_named(key, value):
    with pytest.raises(C.ConfigError, match=f"'{key}'"):
        C.build_config(C.TrainConfig, overrides={key: value})


def test_incompatible_decoder_options():
    with pytest.raises(C.ConfigError, match="normalize_sae_decoder"):
        C.build_config(C.TrainConfig, overrides={"normalize_sae_decoder": True})
    ok = C.build_config(C.TrainConfig, overrides={"normalize_sae_decoder": True, "decoder_heuristic_init": False,
                                                  "scale_sparsity_penalty_by_decoder_norm": False})
    assert ok.normalize_sae_decoder


def test_buffer_smaller_than_batch():
    with pytest.raises(C.ConfigError, match="buffer_size_tokens"):
        C.build_config(C.TrainConfig, overrides={"buffer_size_tokens": 1024, "train_batch_size_tokens": 4096})


def test_schedule_longer_than_training():
    with pytest.raises(C.ConfigError, match="lr_decay_steps"):
        C.build_config(C.TrainConfig, overrides={"training_tokens": 40960, "lr_decay_steps": 20})


def test_parser_flags_map_to_fields():
    ns = build_parser().parse_args(["train", "--lr", "1e-4", "--hook", "blocks.2.hook_resid_post", "--wandb",
                                    "--no-prepend-bos", "--max-rows", "100"])
    assert (ns.lr, ns.hook, ns.wandb, ns.prepend_bos, ns.max_rows) == ("1e-4", "blocks.2.hook_resid_post", "true",
                                                                       "false", "100")
    ns = build_parser().parse_args(["finetune", "--from", "runs/x/sae", "--data", "code"])
    assert ns.from_sae == "runs/x/sae"


def test_reference_lists_every_option():
    md = C.config_reference_markdown(C.TrainConfig)
    for name in C.TrainConfig.__dataclass_fields__:
        assert f"`{name}`" in md
