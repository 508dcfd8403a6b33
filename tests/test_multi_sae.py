"""Many SAEs from one model pass (`saes:` in the train config): each SAE equals the same SAE trained alone on the
same batches, each has its own run directory, and a killed multi-SAE run resumes exactly."""

import json
import shutil

import pytest
import torch

from domain_sae.runs import many as multirun, single as pipeline
from domain_sae.config import ConfigError, TrainConfig, build_config
from domain_sae.training import checkpoint as ckpt

H0, H1 = "blocks.0.hook_mlp_out", "blocks.1.hook_resid_post"
SAES = [{"name": "relu", "hook": H1}, {"name": "topk", "hook": H0, "architecture": "topk", "k": 4, "d_sae": 48}]


def cfg(tmp_path, **kw):
    base = dict(data="chat", max_rows=300, context_size=32, expansion_factor=2, training_tokens=1536,
                train_batch_size_tokens=128, buffer_size_tokens=512, lr=3e-3, log_every=2, eval_every=0,
                n_checkpoints=1, output_dir=str(tmp_path / "runs"), run_name="group", resume_checkpoint_minutes=0,
                model_batch_size=4)
    base.update(kw)
    return build_config(TrainConfig, overrides=base)


def params(sae):
    return {k: v for k, v in sae.state_dict().items() if not k.startswith("_")}


def test_each_sae_equals_training_it_alone(tmp_path, tiny_lm):
    res = multirun.train_many(cfg(tmp_path), SAES, lm=tiny_lm, quiet=True)
    assert [r.run_dir.name for r in res] == ["relu", "topk"]
    for r in res:
        assert (r.sae_dir / "cfg.json").is_file() and (r.run_dir / "metrics.jsonl").is_file()
        assert json.loads((r.run_dir / "status.json").read_text())["state"] == "complete"
    alone = pipeline.train(cfg(tmp_path, hook=H1, run_name="alone"), lm=tiny_lm, quiet=True)
    for k, v in params(alone.sae).items():
        torch.testing.assert_close(params(res[0].sae)[k], v, rtol=1e-5, atol=1e-6)
    topk = json.loads((res[1].sae_dir / "cfg.json").read_text())
    assert topk["d_sae"] == 48 and topk["metadata"]["hook_name"] == H0


def test_killed_multi_run_resumes_exactly(tmp_path, tiny_lm):
    full = multirun.train_many(cfg(tmp_path), SAES, lm=tiny_lm, quiet=True)
    group = tmp_path / "runs" / "group"
    killed = tmp_path / "killed"
    shutil.copytree(group, killed)
    total = 1536 // 128
    for name in ("relu", "topk"):
        for step, _, path in ckpt.list_checkpoints(killed / name):
            if step == total:
                shutil.rmtree(path)
        shutil.rmtree(killed / name / "sae")
        (killed / name / "status.json").write_text(json.dumps({"state": "interrupted"}))
    spec = json.loads((killed / multirun.MULTI_FILE).read_text())
    spec["base"]["output_dir"] = str(tmp_path)
    spec["base"]["run_name"] = "killed"
    (killed / multirun.MULTI_FILE).write_text(json.dumps(spec))
    resumed = multirun.resume_many(killed, lm=tiny_lm, quiet=True)
    for a, b in zip(full, resumed):
        for k, v in params(a.sae).items():
            torch.testing.assert_close(params(b.sae)[k], v, rtol=0, atol=0)


def test_shared_options_are_refused_per_sae(tmp_path):
    with pytest.raises(ConfigError, match="share"):
        multirun.sae_configs(cfg(tmp_path), [{"hook": H0, "training_tokens": 256}])
    with pytest.raises(ConfigError, match="distinct"):
        multirun.sae_configs(cfg(tmp_path), [{"name": "a"}, {"name": "a"}])


def test_cli_trains_a_saes_list(tmp_path, smol_tokenizer, capsys):
    from conftest import make_tiny_model
    from domain_sae.cli import main
    model = tmp_path / "tiny-model"
    make_tiny_model("llama").save_pretrained(model)
    smol_tokenizer.save_pretrained(model)
    (tmp_path / "multi.yaml").write_text(
        f"model: {model}\ndata: code\nmax_rows: 40\ncontext_size: 32\ntraining_tokens: 512\n"
        f"train_batch_size_tokens: 128\nbuffer_size_tokens: 256\neval_every: 0\noutput_dir: {tmp_path / 'runs'}\n"
        f"saes:\n  - {{hook: {H0}, l1_coefficient: 1.0}}\n  - {{hook: {H1}, architecture: topk, k: 4}}\n")
    assert main(["train", "--config", str(tmp_path / "multi.yaml")]) == 0
    assert capsys.readouterr().out.count("SAE saved to") == 2
    assert (tmp_path / "runs" / "multi" / "sae1" / "sae" / "cfg.json").is_file()
    assert main(["train", "--resume", str(tmp_path / "runs" / "multi")]) == 2  # complete: nothing to resume
