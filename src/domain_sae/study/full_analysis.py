"""The rigorous study's findings at one hook, from the measured run points: matched-L0 tables with seed spreads and
difference tests, gap-closed curves (fine-tuned and token-matched scratch SAEs), forgetting, the residual-SAE
baseline, dictionary overlap with its seed control, per-latent decoder rotation and k-sparse probing."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..analysis.matched import (RunPoint, frontiers_by_seed, gap_curve, matched_difference, matched_summary,
                                most_rotated)
from ..analysis.overlap import compare_dictionaries, decoder_drift
from ..analysis.probing import PY_TOKEN_TYPES, CHAT_ROLES, probe_all
from ..analysis.stats import ExtrapolationError, common_l0_range, seed_summary
from .config import GENERAL, scratch_name
from .full_config import FullStudyConfig
from .full_runs import SAEStore, budget_condition, residual_condition, scratch_budget_condition, spec_of

__all__ = ["METRICS", "headline_budget", "middle_l0", "comparison_l0", "domain_findings", "overlap_findings",
           "probing_findings"]

METRICS = {"ev": "explained variance", "ce": "CE-loss score"}


def headline_budget(cfg: FullStudyConfig) -> int:
    """The fine-tuning budget of the main table (:attr:`FullStudyConfig.headline_budget`)."""
    return cfg.headline_budget


def _with(points: Sequence[RunPoint], metric: str) -> list[RunPoint]:
    return [p for p in points if metric in p.metrics]


def _common_range(points: Sequence[RunPoint], conditions: Sequence[str], metric: str) -> Optional[tuple]:
    """(lo, hi): the L0 range every seed frontier of ``conditions`` covers (None when they share none)."""
    try:
        return common_l0_range([f for c in conditions for f in frontiers_by_seed(points, c, metric)])
    except (ExtrapolationError, KeyError):
        return None


def middle_l0(points: Sequence[RunPoint], conditions: Sequence[str], metric: str) -> Optional[float]:
    """Geometric middle of the L0 range every seed frontier of ``conditions`` covers (None when they share none)."""
    r = _common_range(points, conditions, metric)
    return None if r is None else math.sqrt(r[0] * r[1])


def comparison_l0(cfg: FullStudyConfig, points: Sequence[RunPoint], conditions: Sequence[str],
                  metric: str) -> Optional[float]:
    """The L0 at which conditions are compared: for the TopK family the middle k of the ladder (every condition was
    trained at it, so no interpolation between ladder points), clipped into the common range (a measured L0 can sit
    a hair below k); otherwise the geometric middle of the common range (:func:`middle_l0`)."""
    if cfg.sparsity_knob != "k":
        return middle_l0(points, conditions, metric)
    r = _common_range(points, conditions, metric)
    return None if r is None else min(max(float(cfg.middle_sparsity), r[0]), r[1])


def _safe(fn, *args, **kw) -> Any:
    try:
        return fn(*args, **kw)
    except (ExtrapolationError, KeyError) as e:
        return {"unavailable": str(e)}


def domain_findings(cfg: FullStudyConfig, d: str, on_domain: list[RunPoint], on_general: list[RunPoint]) -> dict:
    """Everything the report says about one domain at one hook."""
    hb = headline_budget(cfg)
    main = [GENERAL, scratch_name(d), budget_condition(d, hb)]
    out: dict = {"headline_budget": hb, "metrics": {}}
    for metric in METRICS:
        pts, gen_pts = _with(on_domain, metric), _with(on_general, metric)
        if not pts:
            continue
        m: dict = {"table": _safe(matched_summary, pts, main, metric, n_grid=cfg.n_l0_grid)}
        l0 = comparison_l0(cfg, pts, [GENERAL, scratch_name(d)], metric)
        m["l0"] = l0
        if l0 is not None:
            m["differences"] = [_safe(matched_difference, pts, a, b, metric, l0) for a, b in
                                ((scratch_name(d), GENERAL), (budget_condition(d, hb), GENERAL),
                                 (budget_condition(d, hb), scratch_name(d)))]
            ft = {b: budget_condition(d, b) for b in cfg.budget_ladder}
            sc = {b: scratch_budget_condition(d, b) for b in cfg.budget_ladder}
            m["gap_finetuned"] = _safe(gap_curve, pts, GENERAL, scratch_name(d), ft, metric, l0)
            m["gap_scratch"] = _safe(gap_curve, pts, GENERAL, scratch_name(d), sc, metric, l0)
            m["residual"] = _residual(pts, d, metric)
        m["forgetting"] = _forgetting(cfg, d, gen_pts, metric)
        m["frontiers"] = _frontier_points(pts, main + [residual_condition(d)])
        out["metrics"][metric] = m
    return out


def _frontier_points(points: Sequence[RunPoint], conditions: Sequence[str]) -> dict:
    """condition -> seed -> [[l0, value], ...] for the plots."""
    out: dict = {}
    for p in points:
        if p.condition in conditions:
            out.setdefault(p.condition, {}).setdefault(str(p.seed), []).append([p.metrics["l0"], p.metrics])
    return out


def _forgetting(cfg: FullStudyConfig, d: str, gen_pts: list[RunPoint], metric: str) -> list[dict]:
    rows = []
    for b in cfg.budget_ladder:
        c = budget_condition(d, b)
        l0 = comparison_l0(cfg, gen_pts, [GENERAL, c], metric)
        rows.append({"budget": b, **(_safe(matched_difference, gen_pts, c, GENERAL, metric, l0) if l0 else
                                     {"unavailable": "the fine-tuned and general frontiers share no L0 range"})})
    return rows


def _residual(points: list[RunPoint], d: str, metric: str) -> dict:
    """The stack general + residual (one point per seed) against the general and scratch frontiers at its L0."""
    stack = [p for p in points if p.condition == residual_condition(d)]
    if not stack:
        return {"unavailable": "no residual run"}
    l0 = float(np.mean([p.metrics["l0"] for p in stack]))
    vals = [p.metrics[metric] for p in stack]
    out: dict = {"l0": l0, "stack": vars(seed_summary(vals)), "values": vals}
    for c in (GENERAL, scratch_name(d)):
        try:
            ref = [f.at(l0)[0] for f in frontiers_by_seed(points, c, metric)]
            out[c] = vars(seed_summary(ref))
        except ExtrapolationError as e:
            out[c] = {"unavailable": str(e)}
    return out


def overlap_findings(cfg: FullStudyConfig, store: SAEStore, densities: dict[str, torch.Tensor]) -> dict:
    """Seed control (general seed 1 vs seed 2), general vs scratch and vs its fine-tune, at the middle of the
    sparsity ladder; decoder rotation of every fine-tuned latent (headline budget), the most-rotated alive ones
    listed."""
    s0, s1 = cfg.seeds[0], cfg.seeds[1]
    gen = store.get(spec_of(cfg, "general", None, s0))
    ctrl = store.get(spec_of(cfg, "general", None, s1))
    thr = cfg.match_threshold
    out: dict = {"threshold": thr, cfg.sparsity_knob: cfg.middle_sparsity,
                 "pairs": {"general vs general (other seed)": _pair(gen, ctrl, thr)}, "rotation": {}}
    hb = headline_budget(cfg)
    for d in cfg.domains:
        sc = store.get(spec_of(cfg, "scratch", d, s0))
        sc2 = store.get(spec_of(cfg, "scratch", d, s1))
        ft = store.get(spec_of(cfg, "finetuned", d, s0, budget=hb))
        out["pairs"][f"{d} scratch vs {d} scratch (other seed)"] = _pair(sc, sc2, thr)
        out["pairs"][f"general vs {d} scratch"] = _pair(gen, sc, thr)
        out["pairs"][f"general vs general→{d} @ {hb}"] = _pair(gen, ft, thr)
        cos = decoder_drift(gen.W_dec.detach(), ft.W_dec.detach())
        alive = densities.get(d)
        out["rotation"][d] = {"mean_cosine": float(cos.mean()), "median_cosine": float(cos.median()),
                              "quantiles": {q: float(torch.quantile(cos.float(), q)) for q in (0.01, 0.1, 0.5)},
                              "most_rotated": most_rotated(cos, 10, alive=None if alive is None else alive > 0)}
    return out


def _pair(a, b, thr: float) -> dict:
    """Hungarian matched fraction (cosine >= thr) and mean max-cosine both ways."""
    r = compare_dictionaries(a, b, thr)
    h = r["hungarian"] or {}
    return {"matched_fraction": h.get("matched_fraction"), "matched_mean_cosine": h.get("mean_cosine"),
            "mean_max_cos_a_to_b": r["max_cos_a_to_b"]["mean"], "mean_max_cos_b_to_a": r["max_cos_b_to_a"]["mean"]}


def probing_findings(cfg: FullStudyConfig, store: SAEStore, probes: dict[str, dict]) -> dict:
    """k-sparse probes with the general, scratch and fine-tuned SAEs (seed 1, middle of the sparsity ladder) on each
    probing set."""
    s0, hb = cfg.seeds[0], headline_budget(cfg)
    out: dict = {}
    for d, data in probes.items():
        encoders = {
            GENERAL: store.get(spec_of(cfg, "general", None, s0)).encode,
            scratch_name(d): store.get(spec_of(cfg, "scratch", d, s0)).encode,
            budget_condition(d, hb): store.get(spec_of(cfg, "finetuned", d, s0, budget=hb)).encode}
        names, one_vs_rest = (PY_TOKEN_TYPES, True) if d == "code" else (CHAT_ROLES, False)
        with torch.no_grad():
            out[d] = probe_all(data["acts"], data["labels"], names, encoders, one_vs_rest=one_vs_rest,
                               ks=cfg.probe_ks, seed=cfg.seed)
    return out
