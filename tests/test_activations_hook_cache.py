"""`dsae cache`: the multi-hook activation cache (contents against a fresh model pass, kill/resume byte equality,
refusal of mismatched, unfinished and corrupt caches) and training from it (`--activations`)."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from domain_sae.runs import single as pipeline
from domain_sae.activations.cache import CacheError
from domain_sae.activations.hook_cache import build_cache
from domain_sae.cli import main
from domain_sae.config import DataConfig, TrainConfig, build_config
from domain_sae.data.token_stream import TokenStream
from domain_sae.data.segments import training_mask
from domain_sae.models.hooks import capture, capture_many, resolve_hook

H0, H1 = "blocks.0.hook_mlp_out", "blocks.1.hook_resid_post"


def data_cfg(**kw):
    base = dict(model="tiny-llama", data="chat", max_rows=300, context_size=32, model_batch_size=4)
    base.update(kw)
    return build_config(DataConfig, overrides=base)


def train_cfg(tmp_path, **kw):
    base = dict(model="tiny-llama", hook=H1, data="chat", max_rows=300, context_size=32, expansion_factor=2,
                training_tokens=1024, train_batch_size_tokens=128, buffer_size_tokens=512, lr=3e-3, log_every=2,
                eval_every=0, n_checkpoints=0, output_dir=str(tmp_path / "runs"), run_name="r",
                resume_checkpoint_minutes=0, model_batch_size=4)
    base.update(kw)
    return build_config(TrainConfig, overrides=base)


def files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def cache(tmp_path, tiny_lm):
    return build_cache(tiny_lm, [H0, H1], data_cfg(), tmp_path / "cache", 1500, shard_tokens=400)


def test_capture_many_equals_single_captures(tiny_lm):
    hooks = [resolve_hook(tiny_lm.model, h) for h in (H1, H0)]
    ids = torch.randint(0, 1000, (2, 9))
    got = capture_many(tiny_lm.model, hooks, ids)
    for h in hooks:
        torch.testing.assert_close(got[h.name], capture(tiny_lm.model, h, ids), rtol=0, atol=0)


def test_cache_holds_the_models_activations(cache, tiny_lm):
    root = json.loads((cache / "manifest.json").read_text())
    assert root["complete"] and root["n_tokens"] == 1500 and len(root["shards"]) > 2
    assert root["model"] == "tiny-llama" and set(root["hooks"]) == {H0, H1}
    assert root["data"]["max_rows"] == 300 and "holdout_fraction" in root["data"]
    # recompute independently: the first sequences of the training split, through the model, masked
    stream = iter(TokenStream(data_cfg(), tiny_lm.tokenizer, split="train"))
    seqs = [next(stream) for _ in range(root["n_sequences"])]
    ids = torch.stack([torch.as_tensor(s[0]) for s in seqs])
    segs = torch.stack([torch.as_tensor(s[1]) for s in seqs])
    mask = training_mask(segs, True)
    for hook in (H0, H1):
        want = capture(tiny_lm.model, resolve_hook(tiny_lm.model, hook), ids)[mask][:1500]
        shards = [load_file(cache / s["files"][hook]["file"]) for s in root["shards"]]
        got = torch.cat([s["activations"] for s in shards])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert torch.equal(torch.cat([s["token_ids"] for s in shards]).long(), ids[mask][:1500])
        pos = torch.arange(32).expand_as(ids)[mask][:1500]
        assert torch.equal(torch.cat([s["positions"] for s in shards]).long(), pos)
        assert torch.equal(torch.cat([s["segments"] for s in shards]).long(), segs[mask][:1500].long())


class Killed(Exception):
    """A build killed from its progress callback."""


def kill_after_two(index, manifest):
    """on_shard callback: the build dies once two shards are durable."""
    if index == 1:
        raise Killed


def test_killed_build_resumes_to_identical_files(cache, tmp_path, tiny_lm):
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        build_cache(tiny_lm, [H0, H1], data_cfg(), out, 1500, shard_tokens=400, on_shard=kill_after_two)
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    with pytest.raises(CacheError, match="unfinished"):  # an unfinished cache cannot be trained from
        pipeline.train(train_cfg(tmp_path, activations=str(out)), lm=tiny_lm, quiet=True)
    (out / "blocks.0.hook_mlp_out" / "shard_00002.safetensors.tmp").write_bytes(b"half a shard")
    with pytest.raises(CacheError, match="different options"):
        build_cache(tiny_lm, [H0, H1], data_cfg(), out, 1600, shard_tokens=400)
    build_cache(tiny_lm, [H0, H1], data_cfg(), out, 1500, shard_tokens=400)
    assert files(out) == files(cache)
    with pytest.raises(CacheError, match="already holds a complete"):
        build_cache(tiny_lm, [H0, H1], data_cfg(), out, 1500, shard_tokens=400)


def test_training_from_the_cache_matches_the_live_store(cache, tmp_path, tiny_lm):
    cfg = train_cfg(tmp_path, activations=str(cache / H1), buffer_size_tokens=1024)
    from_cache = pipeline.training_source(cfg, tiny_lm, resolve_hook(tiny_lm.model, H1), 32)
    live = pipeline.live_activation_store(train_cfg(tmp_path, buffer_size_tokens=1024), tiny_lm,
                                          resolve_hook(tiny_lm.model, H1), 32)
    a, b = from_cache.first_buffer(), live.first_buffer()
    # The cache's first refill is the first 1024 kept positions; the live refill reads whole model chunks (a few
    # more). Both are shuffles of the same stream prefix: every cached row is one of the live rows.
    rows = {tuple(r) for r in torch.round(b, decimals=4).tolist()}
    assert a.shape[0] == 1024 and b.shape[0] >= 1024
    assert all(tuple(r) in rows for r in torch.round(a, decimals=4).tolist())
    res = pipeline.train(train_cfg(tmp_path, activations=str(cache)), lm=tiny_lm, quiet=True)
    assert res.summary and json.loads((res.sae_dir / "cfg.json").read_text())["metadata"]["activation_cache"]


def test_mismatched_and_corrupt_caches_are_refused(cache, tmp_path, tiny_lm):
    with pytest.raises(CacheError, match="holds hooks"):
        pipeline.train(train_cfg(tmp_path, hook="blocks.0.hook_resid_post", activations=str(cache)), lm=tiny_lm)
    with pytest.raises(CacheError, match="context_size 32"):
        pipeline.train(train_cfg(tmp_path, context_size=16, activations=str(cache)), lm=tiny_lm)
    with pytest.raises(CacheError, match="hook blocks.0.hook_mlp_out"):
        pipeline.train(train_cfg(tmp_path, activations=str(cache / H0)), lm=tiny_lm)
    with pytest.raises(CacheError, match="exceeds"):
        pipeline.train(train_cfg(tmp_path, training_tokens=4096, activations=str(cache)), lm=tiny_lm)
    tiny_lm.name = "another-model"
    with pytest.raises(CacheError, match="model tiny-llama"):
        pipeline.train(train_cfg(tmp_path, activations=str(cache)), lm=tiny_lm)
    tiny_lm.name = "tiny-llama"
    bad = tmp_path / "bad"
    shutil.copytree(cache, bad)
    shard = bad / H1 / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="corrupt"):
        pipeline.train(train_cfg(tmp_path, activations=str(bad)), lm=tiny_lm)
    assert not (tmp_path / "runs" / "r").exists()


def test_cli_cache_refuses_foreign_directories(tmp_path, capsys):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    assert main(["cache", "--model", "tiny-llama", "--hook", H1, "--tokens", "10", "--out", str(other)]) == 2
    assert "not empty" in capsys.readouterr().err and (other / "notes.txt").read_text() == "keep"


def test_cli_cache_then_train_from_it_and_under_torchrun(tmp_path, tiny_model_dir, capsys):
    data = ["--model", str(tiny_model_dir), "--data", "code", "--max-rows", "40", "--context-size", "32"]
    out = tmp_path / "cache"
    assert main(["cache", *data, "--hook", H0, "--hook", H1, "--tokens", "1024", "--shard-tokens", "300",
                 "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert "--activations" in capsys.readouterr().out
    root = json.loads((out / "manifest.json").read_text())
    assert root["complete"] and root["dtype"] == "bfloat16" and len(root["shards"]) >= 3
    train = ["train", *data, "--hook", H1, "--training-tokens", "512", "--train-batch-size-tokens", "128",
             "--buffer-size-tokens", "256", "--eval-every", "0", "--output-dir", str(tmp_path / "runs")]
    assert main([*train, "--activations", str(out), "--run-name", "cached"]) == 0
    assert (tmp_path / "runs" / "cached" / "sae" / "cfg.json").is_file()
    # two data-parallel processes (gloo) on the live model: one run directory, written by rank 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(_free_port()), "-m", "domain_sae.cli", *train, "--run-name",
                           "ddp", "--device", "cpu"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(x) for x in (tmp_path / "runs" / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["details/n_training_tokens"] == 512
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["cached", "ddp"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
