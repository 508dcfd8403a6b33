"""SparsityTracker against an independent count over the recorded latents."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from domain_sae.training.sparsity import SparsityTracker


def random_latents(steps=23, batch=16, d_sae=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    rates = torch.tensor([0.0, 0.001, 0.02, 0.1, 0.3, 0.5, 0.9, 0.05, 0.0, 0.2, 0.01, 0.7])[:d_sae]
    out = []
    for t in range(steps):
        fire = torch.rand(batch, d_sae, generator=g) < rates
        if t == 2:
            fire[:, 8] = True  # latent 8 fires once, early
        out.append(torch.rand(batch, d_sae, generator=g) * fire)
    return out


def test_window_and_run_stats_match_independent_count():
    fs = random_latents()
    W, DW, thr = 5, 7, 0.03
    tr = SparsityTracker(12, W, DW, thr)
    windows = []
    for t, f in enumerate(fs):
        stats = tr.update(f)
        if stats is not None:
            windows.append((t, stats))
        # independent: steps since last fired
        fired = np.array([[bool((g[:, i] > 0).any()) for i in range(12)] for g in fs[:t + 1]])
        since = np.array([t + 1 - (np.nonzero(fired[:, i])[0].max() + 1) if fired[:, i].any() else t + 1
                          for i in range(12)])
        m = tr.step_metrics()
        assert m["sparsity/dead_features"] == int((since >= DW).sum())
        assert m["sparsity/mean_passes_since_fired"] == pytest.approx(since.mean())
    assert [t for t, _ in windows] == [4, 9, 14, 19]
    for t, stats in windows:
        block = torch.cat(fs[t - W + 1:t + 1]).numpy()
        p = (block > 0).mean(0)
        assert stats["metrics/mean_log10_feature_sparsity"] == pytest.approx(np.log10(p + 1e-10).mean())
        assert stats["sparsity/below_1e-5"] == int((p < 1e-5).sum())
        assert stats["sparsity/below_1e-6"] == int((p < 1e-6).sum())
        assert stats["sparsity/below_dead_threshold"] == int((p < thr).sum())
    allf = torch.cat(fs).numpy()
    expected = np.log10((allf > 0).mean(0) + 1e-10)
    np.testing.assert_allclose(tr.log10_density().numpy(), expected, rtol=1e-6)
    assert tr.log10_density().dtype == torch.float32


def test_pending_window_stats_popped_once_and_state_round_trip():
    fs = random_latents(steps=12)
    a = SparsityTracker(12, 4, 3, 1e-8)
    for f in fs[:6]:
        a.update(f)
    assert a.pop_window_stats() is not None and a.pop_window_stats() is None
    state = a.state_dict()
    b = SparsityTracker(12, 4, 3, 1e-8)
    b.load_state_dict(state)
    for f in fs[6:]:
        sa, sb = a.update(f), b.update(f)
        assert sa == sb
        assert a.step_metrics() == b.step_metrics()
    assert torch.equal(a.log10_density(), b.log10_density())
    with pytest.raises(ValueError, match="d_sae"):
        SparsityTracker(5, 4, 3).load_state_dict(state)


def test_reads_windows_from_train_config():
    from domain_sae.config import TrainConfig
    tr = SparsityTracker.from_config(8, TrainConfig(feature_sampling_window=7, dead_feature_window=9,
                                                    dead_feature_threshold=1e-4))
    assert (tr.feature_sampling_window, tr.dead_feature_window, tr.dead_feature_threshold) == (7, 9, 1e-4)
