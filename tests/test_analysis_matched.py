"""Matched-sparsity comparisons on synthetic run points whose frontiers are known in closed form, and the
per-document errors of EV and CE score against brute-force computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from domain_sae.analysis.matched import (RunPoint, ce_score_with_se, ev_with_se, frontiers_by_seed, gap_curve,
                                         matched_difference, matched_summary, most_rotated)
from domain_sae.analysis.stats import jackknife_ratio_se
from domain_sae.evaluation.metrics import ReconstructionAccumulator

OFFSET = {"general": 0.70, "scratch": 0.80, "ft@1000": 0.72, "ft@10000": 0.76, "ft@100000": 0.79}
SEED_SHIFT = {0: -0.002, 1: 0.0, 2: 0.002}


def _metric(cond, seed, l0):
    return OFFSET[cond] + SEED_SHIFT[seed] + 0.03 * math.log(l0)


def _points(l0s=(10.0, 20.0, 40.0, 80.0)):
    pts = []
    for cond in OFFSET:
        for seed in SEED_SHIFT:
            for i, l0 in enumerate(l0s):
                # each condition lands on slightly different L0s (as real L1 ladders do)
                l0c = l0 * (1.1 if cond == "scratch" else 1.0)
                pts.append(RunPoint(cond, seed, 5.0 / (i + 1), {"l0": l0c, "ev": _metric(cond, seed, l0c)},
                                    {"ev": 0.001}))
    return pts


def test_matched_summary_is_the_closed_form():
    pts = _points()
    fronts = frontiers_by_seed(pts, "general", "ev")
    assert len(fronts) == 3 and fronts[0].l0_range == (10.0, 80.0)
    res = matched_summary(pts, ["general", "scratch"], "ev", n_grid=3)
    assert res["l0_range"] == pytest.approx([11.0, 80.0])
    for row in res["by_l0"]:
        t = row["l0"]
        for cond in ("general", "scratch"):
            # the metric is linear in log L0, so log-L0 interpolation is exact
            assert row[cond]["values"] == pytest.approx([_metric(cond, s, t) for s in SEED_SHIFT])
            assert row[cond]["std"] == pytest.approx(0.002)
            assert row[cond]["doc_se"] is not None
    with pytest.raises(KeyError):
        frontiers_by_seed(pts, "nope", "ev")


def test_matched_difference_and_gap_curve():
    pts = _points()
    d = matched_difference(pts, "scratch", "general", "ev", 20.0)
    assert d["diff"] == pytest.approx(0.10) and d["is_difference"]
    tiny = matched_difference(pts, "ft@100000", "scratch", "ev", 20.0)
    assert tiny["diff"] == pytest.approx(-0.01)
    curve = gap_curve(pts, "general", "scratch", {1000: "ft@1000", 10000: "ft@10000", 100000: "ft@100000"}, "ev",
                      20.0)
    fr = [r["fraction"] for r in curve["budgets"]]
    assert fr == pytest.approx([0.2, 0.6, 0.9])
    half = curve["smallest_budget"]["0.5"]
    # 0.5 lies between 0.2 (1e3) and 0.6 (1e4): 1e3 * 10 ** (0.3 / 0.4)
    assert half["status"] == "reached" and half["budget"] == pytest.approx(1e3 * 10 ** 0.75)
    assert curve["smallest_budget"]["0.9"]["budget"] == pytest.approx(1e5, rel=1e-6)
    assert curve["smallest_budget"]["0.9 (lower bound)"]["status"] in ("reached", "not_reached")


def test_gap_curve_skips_budgets_off_the_range_and_undefined_gaps():
    pts = [p for p in _points() if not (p.condition == "ft@1000" and p.metrics["l0"] < 30)]
    curve = gap_curve(pts, "general", "scratch", {1000: "ft@1000", 10000: "ft@10000"}, "ev", 20.0)
    assert [m["budget"] for m in curve["not_at_l0"]] == [1000] and len(curve["budgets"]) == 1
    unmeasured = [p for p in _points() if p.condition != "ft@1000"]  # e.g. no CE measured at that budget
    curve = gap_curve(unmeasured, "general", "scratch", {1000: "ft@1000", 10000: "ft@10000"}, "ev", 20.0)
    assert curve["not_at_l0"][0]["budget"] == 1000 and "No run of condition" in curve["not_at_l0"][0]["why"]
    assert [r["budget"] for r in curve["budgets"]] == [10000]
    flat = [RunPoint("scratch" if p.condition == "general" else p.condition, p.seed, p.sparsity, p.metrics, p.se)
            for p in _points() if p.condition != "scratch"]
    flat += [RunPoint("general", p.seed, p.sparsity, p.metrics, p.se) for p in _points() if p.condition == "general"]
    curve = gap_curve(flat, "general", "scratch", {1000: "ft@1000"}, "ev", 20.0)
    assert curve["smallest_budget"] is None and "seed spread" in curve["why_no_budget"]


def test_ev_with_se_matches_accumulator_and_brute_force():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g)
    x_hat = x + 0.5 * torch.randn(300, 6, generator=g)
    groups = torch.arange(300) // 25                       # 12 "sequences"
    ev, se = ev_with_se(x, x_hat, groups)
    acc = ReconstructionAccumulator(6, 1)
    acc.update(x, x_hat, torch.ones(300, 1))
    assert ev == pytest.approx(acc.compute()["metrics/explained_variance"], abs=1e-9)
    x64, xh = x.double(), x_hat.double()
    sse = ((x64 - xh) ** 2).sum(-1)
    sst = ((x64 - x64.mean(0)) ** 2).sum(-1)
    num = [float(sse[groups == k].sum()) for k in range(12)]
    den = [float(sst[groups == k].sum()) for k in range(12)]
    assert se == pytest.approx(jackknife_ratio_se(num, den))
    assert 0 < se < 0.1


def test_ce_score_with_se():
    blocks = [{"ce_loss_without_sae": 3.0, "ce_loss_with_sae": 3.3, "ce_loss_with_ablation": 12.0, "n_tokens": 100},
              {"ce_loss_without_sae": 2.5, "ce_loss_with_sae": 3.0, "ce_loss_with_ablation": 11.0, "n_tokens": 50},
              {"ce_loss_without_sae": 3.2, "ce_loss_with_sae": 3.4, "ce_loss_with_ablation": 12.5, "n_tokens": 80}]
    score, se = ce_score_with_se(blocks)
    num = sum(b["n_tokens"] * (b["ce_loss_with_ablation"] - b["ce_loss_with_sae"]) for b in blocks)
    den = sum(b["n_tokens"] * (b["ce_loss_with_ablation"] - b["ce_loss_without_sae"]) for b in blocks)
    assert score == pytest.approx(num / den)
    assert se > 0


def test_most_rotated():
    cos = torch.tensor([0.99, 0.2, 0.95, -0.1, 0.5])
    got = most_rotated(cos, 2)
    assert [r["latent"] for r in got] == [3, 1]
    assert got[0]["angle_degrees"] == pytest.approx(math.degrees(math.acos(-0.1)))
    alive = torch.tensor([True, True, True, False, True])
    assert [r["latent"] for r in most_rotated(cos, 3, alive=alive)] == [1, 4, 2]
    assert np.isfinite([r["cosine"] for r in most_rotated(cos, 10, alive=alive)]).all()
    assert len(most_rotated(cos, 10, alive=alive)) == 4


def test_gap_is_undefined_when_document_errors_swamp_it():
    noisy = [RunPoint(p.condition, p.seed, p.sparsity, p.metrics, {"ev": 0.2}) for p in _points()]
    curve = gap_curve(noisy, "general", "scratch", {1000: "ft@1000"}, "ev", 20.0)
    assert not curve["budgets"][0]["defined"] and curve["smallest_budget"] is None
    assert not matched_difference(noisy, "scratch", "general", "ev", 20.0)["is_difference"]
