"""Trainer: learns a synthetic sparse source, logs exactly the SPEC 3 keys, saves its outputs, resumes exactly
(after Ctrl-C in process and after SIGKILL of a subprocess)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from domain_sae.training import checkpoint as ck
from domain_sae.training.loggers import read_jsonl
from domain_sae.training.schedules import l1_at, lr_at
from domain_sae.training.trainer import Trainer, TrainingInterrupted, batch_metrics
from training_helpers import SyntheticSparseSource, make_sae, run_tiny, tiny_config

HELPER = Path(__file__).with_name("training_helpers.py")

EVERY_LOG = {"losses/mse_loss", "losses/l1_loss", "losses/raw_l1_loss", "losses/overall_loss",
             "metrics/explained_variance", "metrics/explained_variance_std", "metrics/l0",
             "details/current_learning_rate", "details/current_l1_coefficient", "details/n_training_tokens",
             "sparsity/dead_features", "sparsity/mean_passes_since_fired"}
WINDOW = {"metrics/mean_log10_feature_sparsity", "sparsity/below_1e-5", "sparsity/below_1e-6",
          "sparsity/below_dead_threshold"}


def test_batch_metrics_match_numpy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 7, generator=g)
    xh = x + 0.3 * torch.randn(50, 7, generator=g)
    f = torch.relu(torch.randn(50, 11, generator=g))
    m = batch_metrics(x, xh, f)
    X, XH = x.double().numpy(), xh.double().numpy()
    err = ((X - XH) ** 2).sum(1)
    var = ((X - X.mean(0)) ** 2).sum(1)
    assert m["metrics/explained_variance"] == pytest.approx(1 - err.sum() / var.sum(), rel=1e-12)
    assert m["metrics/explained_variance_std"] == pytest.approx(np.std(1 - err / var), rel=1e-12)
    assert m["metrics/l0"] == pytest.approx((f.numpy() > 0).sum(1).mean())


def test_learns_synthetic_source_and_writes_outputs(tmp_path):
    evals = []

    def evaluator(sae):
        evals.append(sae)
        return {"metrics/ce_loss_score": 0.5}

    run = tmp_path / "run"
    summary = run_tiny(run, evaluator=evaluator, eval_every=4, training_tokens=128 * 200, n_checkpoints=1,
                       lr_decay_steps=20)
    recs = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(5, 201, 5))
    assert recs[-1]["metrics/explained_variance"] > 0.8, recs[-1]
    assert recs[-1]["metrics/explained_variance"] > recs[0]["metrics/explained_variance"] + 0.2
    assert 0 < recs[-1]["metrics/l0"] < 64
    # exactly the SPEC names: every log has the per-step keys; window statistics when a window (10 steps) ended;
    # evaluator keys every eval_every=4 logs
    for i, r in enumerate(recs, start=1):
        keys = set(r) - {"step"}
        expected = EVERY_LOG | (WINDOW if r["step"] % 10 == 0 else set()) | (
            {"metrics/ce_loss_score"} if i % 4 == 0 else set())
        assert keys == expected, (r["step"], keys ^ expected)
        t = r["step"] - 1  # the logged batch is that of optimizer step t
        cfg = tiny_config(training_tokens=128 * 200, lr_decay_steps=20)
        assert r["details/current_learning_rate"] == pytest.approx(lr_at(t, cfg))
        assert r["details/current_l1_coefficient"] == pytest.approx(l1_at(t, cfg))
        assert r["losses/raw_l1_loss"] == pytest.approx(r["details/current_l1_coefficient"] * r["losses/l1_loss"],
                                                        rel=1e-5, abs=1e-12)
        assert r["losses/overall_loss"] == pytest.approx(r["losses/mse_loss"] + r["losses/raw_l1_loss"], rel=1e-5)
        assert r["details/n_training_tokens"] == 128 * r["step"]
    assert len(evals) == 10
    for name in ("summary.md", "summary.json", "training_curves.png", "sae/cfg.json", "sae/sae_weights.safetensors",
                 "sae/sparsity.safetensors"):
        assert (run / name).is_file(), name
    assert summary["steps"] == 200 and summary["training_tokens"] == 128 * 200
    assert summary["metrics"]["metrics/explained_variance"] == recs[-1]["metrics/explained_variance"]
    steps = [c[0] for c in ck.list_checkpoints(run)]
    assert steps == [100, 200]
    from domain_sae.sae.io import load_sae
    mid = load_sae(ck.checkpoint_dir(run, 100) / "sae")
    assert torch.equal(mid.W_dec, ck.load_checkpoint(ck.checkpoint_dir(run, 100)).sae_state["W_dec"])
    final, state = load_sae(run / "sae"), ck.load_checkpoint(ck.checkpoint_dir(run, 200)).sae_state
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):  # s = 1: the saved SAE is the final training state
        assert torch.equal(getattr(final, name), state[name])


def test_activation_scale_is_folded_for_eval_and_save_but_kept_in_checkpoints(tmp_path):
    cfg = tiny_config(training_tokens=128 * 20, n_checkpoints=1, log_every=5, eval_every=1,
                      normalize_activations="expected_average_only_in")
    source = SyntheticSparseSource(batch_size=128, buffer_tokens=512, seed=0)
    sample = source.first_buffer()
    s = float(np.sqrt(16) / sample.double().norm(dim=1).mean())
    sae = make_sae(cfg, sample=sample * s)
    seen = []

    def evaluator(folded):
        x = sample[:64]
        with torch.no_grad():
            seen.append((folded(x) - sae(x * s) / s).abs().max().item())  # folded(x) = unscaled(s x) / s
        return {}

    tr = Trainer(sae, cfg, source, tmp_path / "r", evaluator=evaluator, activation_scale=s, verbose=False)
    tr.train()
    assert max(seen) < 1e-4
    c = ck.load_checkpoint(ck.checkpoint_dir(tmp_path / "r", 10))
    assert c.state["activation_scale"] == pytest.approx(s) and c.state["folded"] is False
    assert c.state["trainer"]["n_logs"] == 2
    from domain_sae.sae.io import load_sae
    final, end = load_sae(tmp_path / "r" / "sae"), ck.load_checkpoint(ck.checkpoint_dir(tmp_path / "r", 20))
    assert final.cfg.normalize_activations == "none"
    assert final.cfg.metadata["activation_scale"] == pytest.approx(s)
    torch.testing.assert_close(final.W_enc, end.sae_state["W_enc"] * s)       # W_enc <- s W_enc
    torch.testing.assert_close(final.W_dec, end.sae_state["W_dec"] / s)       # W_dec <- W_dec / s
    torch.testing.assert_close(final.b_dec, end.sae_state["b_dec"] / s)       # b_dec <- b_dec / s
    assert torch.equal(final.b_enc, end.sae_state["b_enc"])


def test_ctrl_c_checkpoint_then_resume_equals_uninterrupted(tmp_path):
    ref = tmp_path / "ref"
    run_tiny(ref)
    expected = read_jsonl(ref / "metrics.jsonl")

    run = tmp_path / "int"
    calls = {"n": 0}

    def interrupt_at_log_5(sae):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does: the step finishes, a checkpoint is written
        return {}

    handler_before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match=r"dsae train --resume") as exc:
        run_tiny(run, evaluator=interrupt_at_log_5, eval_every=1)
    assert ck.latest_checkpoint(run) == exc.value.checkpoint
    assert ck.load_checkpoint(exc.value.checkpoint).step == 25
    assert signal.getsignal(signal.SIGINT) is handler_before  # handler restored

    run_tiny(run, resume=True, evaluator=lambda sae: {}, eval_every=1)
    got = read_jsonl(run / "metrics.jsonl")
    assert got == expected  # bit-for-bit: every logged float identical, no duplicated/missing records
    a = ck.load_checkpoint(ck.latest_checkpoint(ref))
    b = ck.load_checkpoint(ck.latest_checkpoint(run))
    for k in a.sae_state:
        assert torch.equal(a.sae_state[k], b.sae_state[k])


def test_sigkill_subprocess_then_resume_equals_uninterrupted(tmp_path):
    ref = tmp_path / "ref"
    run_tiny(ref)
    expected = read_jsonl(ref / "metrics.jsonl")

    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HELPER.parent)] + sys.path)}
    proc = subprocess.Popen([sys.executable, str(HELPER), str(run), "--delay", "0.03"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    try:
        while ck.latest_checkpoint(run) is None:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = ck.load_checkpoint(ck.latest_checkpoint(run)).step
    assert killed_at < 60
    assert not (run / "sae").exists()  # it never finished

    resume = subprocess.run([sys.executable, str(HELPER), str(run), "--resume"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert resume.returncode == 0, resume.stderr[-2000:]
    assert read_jsonl(run / "metrics.jsonl") == expected


def test_source_exhaustion_is_a_clear_error(tmp_path):
    cfg = tiny_config(training_tokens=128 * 10, n_checkpoints=0, lr_decay_steps=0)

    class Short(SyntheticSparseSource):
        def _read_refill(self):
            return super()._read_refill() if self._cursor == 0 else torch.empty(0, 16)

    tr = Trainer(make_sae(cfg), cfg, Short(batch_size=128, buffer_tokens=512), tmp_path / "r", verbose=False)
    from domain_sae.activations.live import SourceExhaustedError
    with pytest.raises(SourceExhaustedError, match="ran out of data after 512 training tokens"):
        tr.train()


def test_unit_norm_decoder_option_keeps_rows_normalised(tmp_path):
    cfg = tiny_config(training_tokens=128 * 15, n_checkpoints=0, lr_decay_steps=0, normalize_sae_decoder=True,
                      decoder_heuristic_init=False, scale_sparsity_penalty_by_decoder_norm=False)
    sae = make_sae(cfg)
    Trainer(sae, cfg, SyntheticSparseSource(), tmp_path / "r", verbose=False).train()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64), rtol=0, atol=1e-5)


def test_rolling_resume_checkpoints_replace_each_other(tmp_path):
    seen = []
    run = tmp_path / "r"

    def evaluator(sae):
        seen.append([(s, k) for s, k, _ in ck.list_checkpoints(run)])
        return {}

    # a rolling checkpoint after every step (the period is a tiny fraction of a minute)
    run_tiny(run, evaluator=evaluator, eval_every=1, resume_checkpoint_minutes=1e-9, training_tokens=128 * 30,
             n_checkpoints=1, lr_decay_steps=5)
    assert len(seen) == 6
    for i, listing in enumerate(seen[:-1]):
        step = 5 * (i + 1)
        resume = [s for s, k in listing if k == "resume"]
        assert resume == [step - 1]  # only the newest rolling one; the log at step t runs before its checkpoint
        assert [s for s, k in listing if k == "step"] == ([15] if step > 15 else [])
    assert [(s, k) for s, k, _ in ck.list_checkpoints(run)] == [(15, "step"), (30, "step")]
