"""End-to-end training through the pipeline and the CLI on a tiny in-process model with the real data path:
outputs, run-directory safety, bad input leaving nothing behind, resume, fine-tuning (ours and SAELens dirs)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from domain_sae.runs import single as pipeline
from domain_sae.cli import main
from domain_sae.config import ConfigError, TrainConfig, build_config
from domain_sae.errors import RunDirError, UserError
from domain_sae.sae.io import load_sae
from domain_sae.training import checkpoint as ckpt
from training_helpers import killed_copy

HOOK = "blocks.1.hook_resid_post"


def tiny_cfg(tmp_path, **kw):
    base = dict(hook=HOOK, data="chat", max_rows=300, context_size=32, expansion_factor=2, training_tokens=2048,
                train_batch_size_tokens=256, buffer_size_tokens=1024, lr=3e-3, l1_coefficient=1.0, log_every=2,
                eval_every=2, eval_tokens=64, n_checkpoints=1, feature_sampling_window=4, dead_feature_window=4,
                output_dir=str(tmp_path / "runs"), run_name="r", resume_checkpoint_minutes=0)
    base.update(kw)
    return build_config(TrainConfig, overrides=base)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_a_complete_run(tmp_path, tiny_lm):
    res = pipeline.train(tiny_cfg(tmp_path), lm=tiny_lm, quiet=True)
    run = res.run_dir
    for name in ("training_config.json", "metrics.jsonl", "training_curves.png", "summary.md", "summary.json",
                 "sae/cfg.json", "sae/sae_weights.safetensors", "sae/sparsity.safetensors"):
        assert (run / name).is_file(), name
    assert json.loads((run / "status.json").read_text())["state"] == "complete"
    recs = records(run)
    assert recs[-1]["details/n_training_tokens"] == 2048
    assert any("metrics/ce_loss_score" in r and "heldout/explained_variance" in r for r in recs)
    cfg = json.loads((run / "sae/cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == HOOK and cfg["normalize_activations"] == "none"
    # the saved SAE takes raw activations and equals the in-memory result
    sae = load_sae(run / "sae")
    x = torch.randn(7, 32)
    torch.testing.assert_close(sae(x), res.sae(x))


def test_existing_runs_are_protected(tmp_path, tiny_lm):
    cfg = tiny_cfg(tmp_path, training_tokens=512, n_checkpoints=0, eval_every=0)
    pipeline.train(cfg, lm=tiny_lm, quiet=True)
    with pytest.raises(RunDirError, match="already complete"):
        pipeline.train(cfg, lm=tiny_lm, quiet=True)
    with pytest.raises(RunDirError, match="different run.*lr"):
        pipeline.train(tiny_cfg(tmp_path, training_tokens=512, lr=1e-2, eval_every=0), lm=tiny_lm, quiet=True)
    cfg.overwrite = True
    pipeline.train(cfg, lm=tiny_lm, quiet=True)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("bad,match", [
    ({"hook": "blocks.9.hook_mlp_out"}, "layer 9"),
    ({"context_size": 4096}, "4096"),
    ({"data": "COLUMNS"}, "columns found"),
    ({"data": "EMPTY"}, "mpty"),
])
def test_bad_input_is_explained_and_leaves_no_run_dir(tmp_path, tiny_lm, bad, match):
    if bad.get("data") == "COLUMNS":
        bad = {"data": _write_jsonl(tmp_path / "x.jsonl", [{"body": "hello"}, {"body": "there"}])}
    elif bad.get("data") == "EMPTY":
        bad = {"data": _write_jsonl(tmp_path / "e.jsonl", [{"text": ""}])}
    cfg = tiny_cfg(tmp_path, max_rows=None, **bad)
    with pytest.raises(Exception, match=match) as info:
        pipeline.train(cfg, lm=tiny_lm, quiet=True)
    assert isinstance(info.value, UserError)
    assert not (tmp_path / "runs" / "r").exists()


def test_resume_continues_exactly(tmp_path, tiny_lm):
    cfg = tiny_cfg(tmp_path, n_checkpoints=1)
    full = pipeline.train(cfg, lm=tiny_lm, quiet=True).run_dir
    expected = records(full)
    # Simulate a run killed after its mid-run checkpoint: drop the final outputs and the final checkpoint.
    first = min(step for step, _, _ in ckpt.list_checkpoints(full))
    killed = killed_copy(full, tmp_path / "killed", after_step=first)
    (killed / "training_config.json").write_text(
        json.dumps({**json.loads((killed / "training_config.json").read_text()), "run_name": "killed"}))
    res = pipeline.resume(killed, lm=tiny_lm)
    got = records(killed)
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for a, b in zip(got, expected):
        assert a["losses/overall_loss"] == b["losses/overall_loss"]
    torch.testing.assert_close(load_sae(killed / "sae").W_dec, load_sae(full / "sae").W_dec)
    assert res.summary["resumed_from"]


def test_resume_refuses_complete_and_missing(tmp_path, tiny_lm):
    run = pipeline.train(tiny_cfg(tmp_path, n_checkpoints=0, eval_every=0, training_tokens=512), lm=tiny_lm,
                         quiet=True).run_dir
    with pytest.raises(RunDirError, match="already complete"):
        pipeline.resume(run, lm=tiny_lm)
    with pytest.raises(RunDirError, match="not a domain-sae run"):
        pipeline.resume(tmp_path, lm=tiny_lm)


def _saelens_dir(path, style, d_in=32, d_sae=48):
    g = torch.Generator().manual_seed(1)
    w = {"W_enc": torch.randn(d_in, d_sae, generator=g) * 0.1, "b_enc": torch.zeros(d_sae),
         "W_dec": torch.randn(d_sae, d_in, generator=g) * 0.1, "b_dec": torch.zeros(d_in)}
    if style == "v6":
        cfg = {"architecture": "standard", "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
               "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
               "metadata": {"model_name": "tiny-llama", "hook_name": HOOK, "context_size": 32, "prepend_bos": True,
                            "dataset_path": "some/pile", "training_tokens": 123456,
                            "sae_lens_version": "6.5.1"}}
    else:
        cfg = {"model_name": "tiny-llama", "hook_point": HOOK, "hook_point_layer": 1, "d_in": d_in, "d_sae": d_sae,
               "context_size": 32, "dataset_path": "some/pile", "normalize_activations": False,
               "activation_fn_str": "relu", "apply_b_dec_to_input": False, "dtype": "torch.float32"}
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(w, str(path / "sae_weights.safetensors"))
    return path


@pytest.mark.parametrize("style", ["ours", "v6", "flat"])
def test_finetune_records_lineage(tmp_path, tiny_lm, style):
    if style == "ours":
        parent = pipeline.train(tiny_cfg(tmp_path, run_name="parent", n_checkpoints=0, eval_every=0),
                                lm=tiny_lm, quiet=True).sae_dir
        before = 2048
    else:
        parent = _saelens_dir(tmp_path / "lens", style)
        before = 123456 if style == "v6" else 0
    cfg = tiny_cfg(tmp_path, data="code", from_sae=str(parent), run_name="ft", training_tokens=1024,
                   n_checkpoints=0, eval_every=0, lr=1e-3)
    res = pipeline.finetune(cfg, lm=tiny_lm, quiet=True)
    lineage = load_sae(res.sae_dir).cfg.metadata["lineage"]
    assert lineage["parent"] == str(parent)
    assert lineage["tokens_before"] == before and lineage["tokens_after"] == before + 1024
    assert load_sae(res.sae_dir).cfg.metadata["dataset_path"] == "code"
    # it starts from the parent: fine-tuning with a zero learning rate would return the parent's function
    parent_sae = load_sae(parent)
    assert torch.nn.functional.cosine_similarity(res.sae.W_dec, parent_sae.W_dec, dim=-1).mean() > 0.5


def test_finetune_refuses_mismatched_parent(tmp_path, tiny_lm):
    parent = _saelens_dir(tmp_path / "lens", "v6", d_in=16)
    cfg = tiny_cfg(tmp_path, from_sae=str(parent), run_name="ft")
    with pytest.raises(Exception, match="d_in"):
        pipeline.finetune(cfg, lm=tiny_lm, quiet=True)
    with pytest.raises(ConfigError, match="--from"):
        pipeline.finetune(tiny_cfg(tmp_path), lm=tiny_lm)


def test_cli_train_and_clear_errors(tmp_path, tiny_model_dir, capsys):
    args = ["train", "--model", str(tiny_model_dir), "--hook", HOOK, "--data", "code", "--max-rows", "20",
            "--context-size", "32", "--training-tokens", "512", "--train-batch-size-tokens", "256",
            "--buffer-size-tokens", "512", "--eval-every", "0", "--output-dir", str(tmp_path / "runs")]
    assert main(args) == 0
    assert "SAE saved to" in capsys.readouterr().out
    assert main(args) == 2
    assert "already complete" in capsys.readouterr().err
    assert main(args[:3] + ["--hook", "blocks.0.hook_mlp_outt"] + args[5:] + ["--run-name", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Hook 'blocks.0.hook_mlp_outt' does not exist") and "Traceback" not in err
    assert main(["train", "--lr", "fast"]) == 2
    assert "'lr' got 'fast'" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "x").exists()


def test_finetune_keep_optimizer(tmp_path, tiny_lm):
    parent = pipeline.train(tiny_cfg(tmp_path, run_name="parent", n_checkpoints=0, eval_every=0), lm=tiny_lm,
                            quiet=True).sae_dir
    cfg = tiny_cfg(tmp_path, data="code", from_sae=str(parent), run_name="ft", training_tokens=512,
                   n_checkpoints=0, eval_every=0, keep_optimizer=True)
    res = pipeline.finetune(cfg, lm=tiny_lm, quiet=True)
    assert res.summary["steps"] == 2
    lens = _saelens_dir(tmp_path / "lens", "v6")
    with pytest.raises(RunDirError, match="optimizer state"):
        pipeline.finetune(tiny_cfg(tmp_path, from_sae=str(lens), run_name="ft2", keep_optimizer=True,
                                   eval_every=0), lm=tiny_lm, quiet=True)


def test_wandb_offline_run(tmp_path, tiny_lm, monkeypatch):
    """--wandb with mode offline needs no account and writes a local W&B run with the SPEC keys."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = tiny_cfg(tmp_path, training_tokens=1024, n_checkpoints=0, eval_every=0, wandb=True, wandb_mode="offline")
    res = pipeline.train(cfg, lm=tiny_lm, quiet=True)
    runs = list(res.run_dir.rglob("offline-run-*"))
    assert runs, "no offline W&B run directory was written"
    assert any(p.suffix == ".wandb" for p in runs[0].rglob("*"))


def test_cli_eval_uses_the_training_split(tmp_path, tiny_model_dir, capsys):
    run_args = ["train", "--model", str(tiny_model_dir), "--hook", HOOK, "--data", "chat", "--max-rows", "200",
                "--context-size", "32", "--training-tokens", "512", "--train-batch-size-tokens", "256",
                "--buffer-size-tokens", "512", "--eval-every", "0", "--holdout-fraction", "0.2",
                "--output-dir", str(tmp_path / "runs"), "--run-name", "r"]
    assert main(run_args) == 0
    sae_dir = tmp_path / "runs" / "r" / "sae"
    meta = json.loads((sae_dir / "cfg.json").read_text())["metadata"]
    assert meta["holdout_fraction"] == 0.2 and meta["context_size"] == 32
    out = tmp_path / "eval"
    assert main(["eval", str(sae_dir), "--data", "chat", "--tokens", "64", "--out", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert "0.2" in json.dumps(report["config"]) and (out / "eval.md").is_file()
    assert main(["eval", str(sae_dir), "--data", "chat", "--hook", "blocks.0.hook_mlp_out", "--out",
                 str(tmp_path / "e2")]) == 2
    assert "error:" in capsys.readouterr().err
