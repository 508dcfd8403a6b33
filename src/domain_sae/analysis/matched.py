"""Matched-sparsity comparisons of study conditions, built on :mod:`.stats`.

A *run point* is one trained SAE evaluated on one held-out set: its condition (``"general"``, ``"chat scratch"``,
``"general→chat @ 100000"`` ...), seed, L1 coefficient, and metrics (``l0`` and e.g. ``explained_variance``,
``ce_loss_score``) with their per-document standard errors (``se`` dict, same keys). For every (condition, seed) the
points of its L1 ladder form one :class:`~.stats.Frontier` per metric; conditions are compared at L0 values inside
the common range of all their frontiers (never extrapolated), seed by seed, then summarised over seeds.

Per-document errors
    :func:`ev_with_se` gives explained variance with a jackknife se over held-out sequences (the SST uses the mean
    of all evaluated tokens, held fixed in the jackknife); :func:`ce_score_with_se` the CE-loss score with a
    jackknife se over blocks of sequences evaluated separately:
    ``score = sum_b n_b (CE_abl,b - CE_sae,b) / sum_b n_b (CE_abl,b - CE_clean,b)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

from .stats import (BudgetCrossing, ExtrapolationError, Frontier, common_l0_range, difference_test,
                    gap_closed_interval, jackknife_ratio_se, l0_grid, seed_summary, smallest_budget)

__all__ = ["RunPoint", "frontiers_by_seed", "matched_summary", "matched_difference", "gap_curve", "ev_with_se",
           "ce_score_with_se", "most_rotated"]


@dataclass(frozen=True)
class RunPoint:
    condition: str
    seed: int
    sparsity: float  # the run's L1 coefficient, or k for the TopK family
    metrics: Mapping[str, float]
    se: Mapping[str, float] = field(default_factory=dict)


def frontiers_by_seed(points: Iterable[RunPoint], condition: str, metric: str) -> list[Frontier]:
    """One frontier per seed of ``condition`` for ``metric`` (points: their sparsity ladder)."""
    by_seed: dict[int, list[RunPoint]] = {}
    for p in points:
        if p.condition == condition:
            by_seed.setdefault(p.seed, []).append(p)
    if not by_seed:
        raise KeyError(f"No run of condition {condition!r}.")
    out = []
    for seed, ps in sorted(by_seed.items()):
        ses = [p.se.get(metric, float("nan")) for p in ps]
        out.append(Frontier.from_points([p.metrics["l0"] for p in ps], [p.metrics[metric] for p in ps],
                                        ses, name=f"{condition} (seed {seed})"))
    return out


def _values_at(fronts: Sequence[Frontier], l0: float) -> tuple[np.ndarray, np.ndarray]:
    pairs = [f.at(l0) for f in fronts]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def matched_summary(points: Sequence[RunPoint], conditions: Sequence[str], metric: str, *, n_grid: int = 3,
                    targets: Optional[Sequence[float]] = None) -> dict:
    """Every condition's ``metric`` at common L0 values: ``{"l0_range", "targets", "by_l0": [{"l0", condition:
    {"mean", "std", "n", "values", "doc_se"}}]}``. ``targets`` default: ``n_grid`` log-spaced L0s over the common
    range of all the conditions' seed frontiers."""
    fronts = {c: frontiers_by_seed(points, c, metric) for c in conditions}
    lo, hi = common_l0_range([f for fs in fronts.values() for f in fs])
    targets = list(targets) if targets is not None else l0_grid(lo, hi, n_grid)
    rows = []
    for t in targets:
        row: dict = {"l0": float(t)}
        for c, fs in fronts.items():
            vals, ses = _values_at(fs, t)
            s = seed_summary(vals)
            row[c] = {"mean": s.mean, "std": s.std, "n": s.n, "values": vals.tolist(),
                      "doc_se": float(np.nanmean(ses)) if np.isfinite(ses).any() else None}
        rows.append(row)
    return {"metric": metric, "l0_range": [lo, hi], "targets": [float(t) for t in targets], "by_l0": rows}


def matched_difference(points: Sequence[RunPoint], a: str, b: str, metric: str, l0: float) -> dict:
    """:func:`~.stats.difference_test` of condition ``a`` minus ``b`` at L0 ``l0`` (per-seed values, with the
    per-document ses of both). JSON-ready."""
    va, sa = _values_at(frontiers_by_seed(points, a, metric), l0)
    vb, sb = _values_at(frontiers_by_seed(points, b, metric), l0)
    t = difference_test(va, vb, doc_se_a=sa if np.isfinite(sa).all() else None,
                        doc_se_b=sb if np.isfinite(sb).all() else None)
    return {"a": a, "b": b, "metric": metric, "l0": float(l0), "diff": t.diff, "se": t.se, "threshold": t.threshold,
            "seed_spread": t.seed_spread, "is_difference": t.is_difference, "reason": t.reason,
            "text": t.format()}


def gap_curve(points: Sequence[RunPoint], general: str, scratch: str, finetuned: Mapping[int, str], metric: str,
              l0: float, *, targets: Sequence[float] = (0.5, 0.9), seed: int = 0) -> dict:
    """Fraction of the ``general`` -> ``scratch`` gap closed by each fine-tuned condition (``finetuned``: budget ->
    condition) at L0 ``l0``, with bootstrap intervals over seeds, and the smallest budgets closing ``targets``
    (from the mean curve, and conservatively from the lower interval bound). Budgets whose frontier does not reach
    ``l0`` (or that have no run measured on ``metric``) are listed under ``"not_at_l0"``."""
    g, g_se = _values_at(frontiers_by_seed(points, general, metric), l0)
    s, s_se = _values_at(frontiers_by_seed(points, scratch, metric), l0)
    # the gap is a difference only beyond the seed spread and the per-document errors of both (as in
    # matched_difference), so "defined" here agrees with the difference test the report prints
    doc_gap = math.sqrt(float(np.mean(g_se)) ** 2 + float(np.mean(s_se)) ** 2) \
        if np.isfinite(g_se).all() and np.isfinite(s_se).all() else None
    rows, missing = [], []
    for budget in sorted(finetuned):
        try:
            c, _ = _values_at(frontiers_by_seed(points, finetuned[budget], metric), l0)
        except (ExtrapolationError, KeyError) as e:  # outside the L0 range, or not measured for this metric
            missing.append({"budget": budget, "why": str(e).strip("'\"")})
            continue
        gc = gap_closed_interval(g, s, c, doc_se_gap=doc_gap, seed=seed)
        rows.append({"budget": budget, "fraction": gc.fraction, "low": gc.low, "high": gc.high,
                     "defined": gc.defined, "values": c.tolist(), "text": gc.format()})
    out: dict = {"metric": metric, "l0": float(l0), "general": g.tolist(), "scratch": s.tolist(), "budgets": rows,
                 "not_at_l0": missing}
    defined = [r for r in rows if r["defined"]]
    if rows and len(defined) == len(rows):
        b = [r["budget"] for r in rows]
        cross: dict[str, BudgetCrossing] = {}
        for target in targets:
            cross[f"{target:g}"] = smallest_budget(b, [r["fraction"] for r in rows], target)
            cross[f"{target:g} (lower bound)"] = smallest_budget(b, [r["low"] for r in rows], target)
        out["smallest_budget"] = {k: {"target": v.target, "budget": v.budget, "status": v.status, "text": v.format()}
                                  for k, v in cross.items()}
    else:
        out["smallest_budget"] = None
        out["why_no_budget"] = ("the general-to-scratch gap is not larger than the seed spread at this L0"
                                if rows else "no fine-tuning budget reaches this L0")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Per-document errors

@torch.no_grad()
def ev_with_se(x: torch.Tensor, x_hat: torch.Tensor, groups: torch.Tensor) -> tuple[float, float]:
    """Explained variance ``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over all rows (float64) and its
    jackknife se over ``groups`` (one id per row, e.g. the held-out sequence)."""
    x64, xh = x.double(), x_hat.double()
    sse = ((x64 - xh) ** 2).sum(-1)
    sst = ((x64 - x64.mean(0)) ** 2).sum(-1)
    _, inv = torch.unique(groups, return_inverse=True)
    k = int(inv.max()) + 1
    num = torch.zeros(k, dtype=torch.float64).index_add_(0, inv, sse)
    den = torch.zeros(k, dtype=torch.float64).index_add_(0, inv, sst)
    ev = 1.0 - float(num.sum() / den.sum())
    return ev, jackknife_ratio_se(num.numpy(), den.numpy())


def ce_score_with_se(blocks: Sequence[Mapping[str, float]]) -> tuple[float, float]:
    """CE-loss score and its jackknife se over blocks, each a dict with ``ce_loss_without_sae``,
    ``ce_loss_with_sae``, ``ce_loss_with_ablation`` (nats per counted token) and ``n_tokens`` (tokens counted)."""
    n = np.array([b["n_tokens"] for b in blocks], dtype=np.float64)
    num = n * np.array([b["ce_loss_with_ablation"] - b["ce_loss_with_sae"] for b in blocks])
    den = n * np.array([b["ce_loss_with_ablation"] - b["ce_loss_without_sae"] for b in blocks])
    return float(num.sum() / den.sum()), jackknife_ratio_se(num, den)


def most_rotated(cosines: torch.Tensor, k: int = 10, *, alive: Optional[torch.Tensor] = None) -> list[dict]:
    """The ``k`` latents whose decoder direction rotated most during fine-tuning: the smallest cos(W_dec,i before,
    W_dec,i after) (``cosines`` from :func:`.overlap.decoder_drift`), among ``alive`` latents when given; each as
    ``{"latent", "cosine", "angle_degrees"}``."""
    c = cosines.double().clone()
    if alive is not None:
        c[~alive.bool()] = float("inf")
    order = torch.sort(c, stable=True).indices[:k]
    return [{"latent": int(i), "cosine": float(cosines[i]),
             "angle_degrees": float(np.degrees(np.arccos(np.clip(float(cosines[i]), -1.0, 1.0))))}
            for i in order if torch.isfinite(c[i])]
