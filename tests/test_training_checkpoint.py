"""Atomic checkpoints: exact round trip of model/optimizer/RNG/sparsity, crash safety, latest selection."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from domain_sae.training import checkpoint as ck
from domain_sae.training.sparsity import SparsityTracker


def make(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.99))
    return model, opt


def train_steps(model, opt, n, seed):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(n):
        x = torch.randn(5, 4, generator=g)
        loss = model(x).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def save(path, model, opt, step=3, tracker=None):
    tracker = tracker or SparsityTracker(3, 2, 2)
    return ck.save_checkpoint(path, sae_state=model.state_dict(), optimizer_state=opt.state_dict(),
                              sparsity_state=tracker.state_dict(),
                              state={"step": step, "tokens": 10 * step, "activation_scale": 2.5,
                                     "source": {"refill_index": 1}, "config": {"lr": 1e-2}, "trainer": {}})


def test_round_trip_continues_bit_for_bit(tmp_path):
    model, opt = make()
    train_steps(model, opt, 3, seed=1)
    tracker = SparsityTracker(3, 2, 2)
    tracker.update(torch.tensor([[1.0, 0.0, 2.0]]))
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    path = save(ck.checkpoint_dir(tmp_path, 3), model, opt, tracker=tracker)
    expected_rng = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    expected = train_steps(model, opt, 4, seed=2)

    m2, o2 = make(seed=99)
    c = ck.load_checkpoint(path)
    m2.load_state_dict(c.sae_state)
    o2.load_state_dict(c.optimizer_state)
    ck.restore_rng_state(c.rng_state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected_rng
    assert train_steps(m2, o2, 4, seed=2) == expected
    assert c.step == 3 and c.state["activation_scale"] == 2.5 and c.state["folded"] is False
    t2 = SparsityTracker(3, 2, 2)
    t2.load_state_dict(c.sparsity_state)
    assert torch.equal(t2.log10_density(), tracker.log10_density())
    # nothing that needs unpickling
    assert sorted(p.suffix for p in path.iterdir()) == [".json", ".safetensors", ".safetensors", ".safetensors"]


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = make()
    train_steps(model, opt, 2, seed=1)
    good = save(ck.checkpoint_dir(tmp_path, 2), model, opt, step=2)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    calls = {"n": 0}
    real = ck.save_file

    def failing(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        return real(*a, **kw)

    monkeypatch.setattr(ck, "save_file", failing)
    with pytest.raises(OSError, match="simulated"):
        save(ck.checkpoint_dir(tmp_path, 4), model, opt, step=4)       # a new checkpoint
    calls["n"] = 0
    with pytest.raises(OSError, match="simulated"):
        save(ck.checkpoint_dir(tmp_path, 2), model, opt, step=2)       # overwriting the same name
    assert ck.latest_checkpoint(tmp_path) == good
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert [p.name for p in (tmp_path / ck.CHECKPOINTS).iterdir()] == [good.name]


def test_killed_write_leftovers_are_ignored_and_cleaned(tmp_path):
    model, opt = make()
    good = save(ck.checkpoint_dir(tmp_path, 5), model, opt, step=5)
    half = tmp_path / ck.CHECKPOINTS / "step_000000009.tmp-abcd"   # what SIGKILL during a write leaves
    half.mkdir()
    (half / "sae_weights.safetensors").write_bytes(b"partial")
    unnamed = tmp_path / ck.CHECKPOINTS / "resume_000000007"          # no trainer_state.json: incomplete
    unnamed.mkdir()
    assert ck.latest_checkpoint(tmp_path) == good
    ck.cleanup_incomplete(tmp_path)
    assert not half.exists()


def test_latest_prefers_highest_step_and_rolling_ones_count(tmp_path):
    model, opt = make()
    assert ck.latest_checkpoint(tmp_path) is None
    save(ck.checkpoint_dir(tmp_path, 10), model, opt, step=10)
    r = save(ck.checkpoint_dir(tmp_path, 12, "resume"), model, opt, step=12)
    assert ck.latest_checkpoint(tmp_path) == r
    s = save(ck.checkpoint_dir(tmp_path, 12), model, opt, step=12)
    assert ck.latest_checkpoint(tmp_path) == s
    ck.remove_checkpoint(r)
    assert [c[0] for c in ck.list_checkpoints(tmp_path)] == [10, 12]


def test_unreadable_checkpoint_errors(tmp_path):
    with pytest.raises(ck.CheckpointError, match="not a complete"):
        ck.load_checkpoint(tmp_path)
    model, opt = make()
    p = save(ck.checkpoint_dir(tmp_path, 1), model, opt, step=1)
    (p / "optimizer.safetensors").write_bytes(b"garbage")
    with pytest.raises(ck.CheckpointError, match="unreadable"):
        ck.load_checkpoint(p)
