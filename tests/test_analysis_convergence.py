"""Is an SAE trained: the plateau slope against numpy's least-squares fit over the stated window, the stop rule
(plateau or one pass, whichever first), the checkpoint ladder, and the seed-to-seed overlap on dictionaries whose
matched fraction is known by construction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from domain_sae.analysis.convergence import (CONVERGED_SEED_OVERLAP, PLATEAU_SLOPE, plateau_checkpoints,
                                             plateau_slope, seed_overlap, stop_decision)
from domain_sae.analysis.errors import AnalysisError


def _ev(tokens):
    """A saturating EV curve, 0.9 - 0.3 * 2^(-x/2) with x = doublings from 10k tokens: its slope per doubling,
    0.15 ln 2 * 2^(-x/2), falls below 0.005 after about 8.8 doublings (4.5M tokens)."""
    x = np.log2(np.asarray(tokens, dtype=np.float64) / 1e4)
    return 0.9 - 0.3 * 2 ** (-x / 2)


def test_slope_is_least_squares_in_log2_tokens_over_the_last_doubling():
    tokens = [10_000, 20_000, 40_000, 60_000, 80_000, 100_000, 160_000]
    ev = [0.40, 0.55, 0.63, 0.66, 0.700, 0.7015, 0.703]
    fit = plateau_slope(tokens, ev)
    window = [i for i, t in enumerate(tokens) if t >= 80_000]        # t_max / 2 = 80k included
    expected = np.polyfit(np.log2(np.take(tokens, window)), np.take(ev, window), 1)[0]
    assert fit.slope == pytest.approx(expected, rel=1e-12)
    assert fit.window == (80_000, 160_000) and fit.n_points == 3
    assert fit.plateaued == (expected < PLATEAU_SLOPE) and fit.plateaued
    # the order of the checkpoints does not matter; a steeper end is not a plateau
    assert plateau_slope(tokens[::-1], ev[::-1]).slope == pytest.approx(fit.slope, rel=1e-12)
    steep = plateau_slope([1e4, 2e4, 4e4], [0.4, 0.5, 0.6])
    assert steep.slope == pytest.approx(0.1) and not steep.plateaued and ">=" in steep.why


def test_no_slope_before_a_full_doubling():
    fit = plateau_slope([150_000, 180_000, 200_000], [0.70, 0.70, 0.70])
    assert math.isnan(fit.slope) and not fit.plateaued and "less than one doubling" in fit.why
    assert math.isnan(plateau_slope([1e5], [0.5]).slope)
    with pytest.raises(AnalysisError):
        plateau_slope([0, 1e4], [0.1, 0.2])


def test_checkpoint_ladder():
    ladder = plateau_checkpoints(10_000, 1_000_000)
    assert ladder[:4] == [10_000, 14_142, 20_000, 28_284] and ladder[-1] == 1_000_000
    assert all(b > a for a, b in zip(ladder, ladder[1:]))
    for t in ladder[4:]:                                  # every doubling holds 3 checkpoints (per_doubling + 1)
        assert sum(t / 2 <= s <= t for s in ladder) >= 3
    assert plateau_checkpoints(5, 5) == [5]
    assert plateau_checkpoints(1000, 4000, per_doubling=1) == [1000, 2000, 4000]


def test_stop_rule_plateau_or_one_pass_whichever_first():
    ladder = plateau_checkpoints(10_000, 50_000_000)
    ev = _ev(ladder)
    stops = [stop_decision(ladder[:i + 1], ev[:i + 1], split_tokens=1e12) for i in range(len(ladder))]
    first = next(i for i, s in enumerate(stops) if s.stop)
    assert stops[first].reason == "plateau" and not stops[first].one_pass
    assert all(not s.stop for s in stops[:first])
    window = [j for j in range(first + 1) if ladder[j] >= ladder[first] / 2]
    assert np.polyfit(np.log2(np.take(ladder, window)), ev[window], 1)[0] < PLATEAU_SLOPE
    # a corpus smaller than the plateau point: one pass comes first
    early = stop_decision(ladder[:5], ev[:5], split_tokens=ladder[4])
    assert early.stop and early.reason == "one_pass" and early.one_pass and "one pass" in early.format()
    late = stop_decision(ladder[:first + 1], ev[:first + 1], split_tokens=ladder[first])
    assert late.reason == "plateau" and late.one_pass            # both at once: the plateau is named
    going = stop_decision(ladder[:3], ev[:3], split_tokens=1e9)
    assert not going.stop and going.reason is None and going.to_dict()["text"].startswith("continue")


def test_seed_overlap_matches_a_known_fraction():
    g = torch.Generator().manual_seed(0)
    d_sae, d_in, shared = 64, 256, 40
    base = torch.randn(d_sae, d_in, generator=g)
    seeds = []
    for s in range(3):
        w = torch.randn(d_sae, d_in, generator=g)          # random directions: cosines ~ N(0, 1/256), far below 0.7
        perm = torch.randperm(d_sae, generator=g)
        w[perm[:shared]] = base[:shared] * (1 + s) + 0.05 * torch.randn(shared, d_in, generator=g)
        seeds.append(w)
    res = seed_overlap(seeds)
    assert [p[:2] for p in res.pairs] == [(0, 1), (0, 2), (1, 2)]
    assert res.fractions == pytest.approx([shared / d_sae] * 3)
    assert res.reference == CONVERGED_SEED_OVERLAP == (0.30, 0.53)
    assert "62% of latents" in res.format() and "30-53%" in res.format()
    assert res.to_dict()["mean"] == pytest.approx(shared / d_sae)
    with pytest.raises(AnalysisError, match="at least 2"):
        seed_overlap(seeds[:1])
