"""The study's findings at one hook, from the measured run points, and the answer in at most five sentences.

Per domain and metric (``ev``: explained variance on the reconstruction set; ``ce``: CE-loss score on the model-pass
set), conditions are compared at one sparsity: with a ladder of two or more values at matched L0 (for the TopK
family the middle k, else the geometric middle of the L0 range every condition covers; log-L0 interpolation,
:mod:`domain_sae.analysis.matched`), with one value at that value (each SAE's own L0 is reported).

Which test calls a difference (the report says which gave each verdict):

- ``paired``: both conditions were measured on the same held-out documents (their per-document sums are kept): a
  paired bootstrap over those documents, and over seeds where a condition has several (:mod:`.verdicts`); the
  gap-closed fractions too, with their paired intervals. The others are the fall-backs when the sums are missing:
- ``welch``: both conditions have two or more seeds: :func:`domain_sae.analysis.stats.difference_test` (Welch over
  seeds plus the per-document errors, and the seed spread itself);
- ``yardstick``: a condition has one seed: ``|Δ| > FACTOR × spread``, spread = max − min of the general SAE's seed
  values (its control seed), floored at :data:`MIN_SPREAD`: a rough yardstick of run-to-run noise.

The gap closed by a per-budget condition X at budget b is ``(X@b − general) / (scratch − general)`` (undefined when
scratch − general is not a difference), with a bootstrap interval over seeds; the controls (token-matched scratch,
equal-total-token scratch, continued general) get the same curve.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np

from ..analysis.matched import RunPoint, frontiers_by_seed, gap_curve, matched_difference, matched_summary
from ..analysis.stats import ExtrapolationError, common_l0_range, seed_summary, smallest_budget
from .config import GENERAL, StudyConfig
from .runs import KINDS, Run

METRICS = {"ce": "CE-loss score", "ev": "explained variance"}
FACTOR, MIN_SPREAD = 2.0, 0.002
TESTS = {"paired": "a paired bootstrap over the held-out documents (resampled once for every SAE compared, and "
                   "over seeds where a condition has several), 95% interval excluding 0",
         "welch": "a Welch test over seeds with the per-document errors, beyond the seed spread",
         "yardstick": f"a yardstick (one seed per condition): beyond {FACTOR:g}× the seed-to-seed spread of the "
                      f"general SAE"}
NO_GAP = "undefined (scratch is not better than general beyond the test)"


def condition(kind: str, domain: Optional[str], budget: Optional[int] = None) -> str:
    return Run(kind, domain if KINDS[kind].data == "domain" else None, 0, 0, budget).condition


def per_budget_kinds(cfg: StudyConfig) -> list[str]:
    return [k for k in cfg.conditions if KINDS[k].per_budget]


def _safe(fn, *args, **kw) -> Any:
    try:
        return fn(*args, **kw)
    except (ExtrapolationError, KeyError, ValueError) as e:
        return {"unavailable": str(e).strip("'\"")}


def _common_range(points: Sequence[RunPoint], conditions: Sequence[str], metric: str) -> Optional[tuple]:
    try:
        return common_l0_range([f for c in conditions for f in frontiers_by_seed(points, c, metric)])
    except (ExtrapolationError, KeyError):
        return None


def comparison_l0(cfg: StudyConfig, points: Sequence[RunPoint], conditions: Sequence[str],
                  metric: str) -> Optional[float]:
    """The L0 conditions are compared at: the middle k for the TopK family (every condition was trained at it),
    clipped into the common range; otherwise the geometric middle of the common range (None: there is none)."""
    r = _common_range(points, conditions, metric)
    if r is None:
        return None
    if cfg.sparsity_knob == "k" or len(cfg.sparsity) == 1:
        return min(max(float(cfg.middle_sparsity), r[0]), r[1])
    return math.sqrt(r[0] * r[1])


def _values(points: Sequence[RunPoint], cond: str, metric: str, l0: float) -> np.ndarray:
    return np.array([f.at(l0)[0] for f in frontiers_by_seed(points, cond, metric)])


def yardstick(points: Sequence[RunPoint], metric: str, l0: float) -> float:
    """max − min of the general SAE's seed values at ``l0``, floored at MIN_SPREAD (NaN with one seed)."""
    v = _safe(_values, points, GENERAL, metric, l0)
    return max(float(v.max() - v.min()), MIN_SPREAD) if isinstance(v, np.ndarray) and v.size > 1 else math.nan


def _verdict_text(diff: float, thr: float, ok: bool) -> str:
    return f"{diff:+.3f} (± {thr:.3f}: {'a difference' if ok else 'not a difference'})"


def compare(points: Sequence[RunPoint], a: str, b: str, metric: str, l0: float, yard: float,
            paired: Any = None) -> dict:
    """a − b at ``l0``: the paired bootstrap when both were measured on the same documents (``paired``: a
    :class:`.verdicts.PairedVerdicts`), else the Welch test, or the yardstick when a side has one seed."""
    r = paired.difference(a, b, metric, l0) if paired is not None else None
    if r is not None:
        return r
    r = _safe(matched_difference, points, a, b, metric, l0)
    if "unavailable" in r:
        return {"a": a, "b": b, **r}
    if "at least 2 seeds" not in r["reason"]:
        return {**r, "test": "welch"}
    ok = math.isfinite(yard) and abs(r["diff"]) > FACTOR * yard
    return {**r, "test": "yardstick", "threshold": FACTOR * yard, "is_difference": bool(ok),
            "text": _verdict_text(r["diff"], FACTOR * yard, ok) if math.isfinite(yard) else f"{r['diff']:+.3f} "
            f"(no yardstick: the general SAE has one seed)"}


def gap(cfg: StudyConfig, points: Sequence[RunPoint], d: str, kind: str, metric: str, l0: float, yard: float,
        paired: Any = None) -> dict:
    """Gap closed by ``kind`` at every budget (``gap_curve``; with one seed per condition, defined by the
    yardstick; the paired fractions and intervals where ``paired`` has the sums). Defined only when scratch is
    better than general by the test: otherwise there is no gap to close."""
    scratch = condition("scratch", d)
    conds = {b: condition(kind, d, b) for b in cfg.budgets_of(kind)}
    g = _safe(gap_curve, points, GENERAL, scratch, conds, metric, l0)
    if "unavailable" in g or not g["budgets"]:
        return {**g, "test": "welch"}
    p = paired.gap(GENERAL, scratch, conds, metric, l0) if paired is not None else None
    if p is not None and len(p["rows"]) == len(g["budgets"]):
        by_budget = {r["budget"]: r for r in p["rows"]}
        for r in g["budgets"]:
            r.update(by_budget[r["budget"]])
        g.update({k: p[k] for k in ("smallest_budget", "why_no_budget", "label") if k in p})
        if p["smallest_budget"] is not None:
            g.pop("why_no_budget", None)
        return {**g, "test": "paired"}
    test = "welch" if len(g["scratch"]) > 1 and len(g["general"]) > 1 else "yardstick"
    gain = float(np.mean(g["scratch"]) - np.mean(g["general"]))
    defined = gain > 0 and (g["budgets"][0]["defined"] if test == "welch" else gain > FACTOR * yard)
    for r in g["budgets"]:
        r["defined"] = bool(defined)
        r["text"] = (r["text"] if test == "welch" else f"{100 * r['fraction']:.0f}%") if defined else NO_GAP
    if test == "welch" and not defined:
        g["smallest_budget"], g["why_no_budget"] = None, "scratch is not better than general beyond the test"
    elif test == "yardstick":
        cross = {f"{t:g}": smallest_budget([r["budget"] for r in g["budgets"]], [r["fraction"] for r in g["budgets"]],
                                           t) for t in (0.5, 0.9)}
        g["smallest_budget"] = {k: {"target": v.target, "budget": v.budget, "status": v.status, "text": v.format()}
                                for k, v in cross.items()} if defined else None
    return {**g, "test": test}


def domain_findings(cfg: StudyConfig, d: str, on_domain: list[RunPoint], on_general: list[RunPoint],
                    paired: Any = None, paired_general: Any = None) -> dict:
    """Everything the report says about one domain at one hook (module docstring); ``paired`` /
    ``paired_general``: the :class:`.verdicts.PairedVerdicts` of the domain's and the general held-out set."""
    hb, kinds = cfg.headline, per_budget_kinds(cfg)
    scratch = condition("scratch", d)
    main = [GENERAL, scratch] + [condition(k, d, hb) for k in kinds]
    out: dict = {"headline_budget": hb, "matched": len(cfg.sparsity) > 1, "metrics": {}}
    for metric in METRICS:
        pts = [p for p in on_domain if metric in p.metrics]
        gen_pts = [p for p in on_general if metric in p.metrics]
        if not pts:
            continue
        m: dict = {"table": _safe(matched_summary, pts, [c for c in main if any(p.condition == c for p in pts)],
                                  metric, n_grid=cfg.n_l0_grid if len(cfg.sparsity) > 1 else 1)}
        l0 = comparison_l0(cfg, pts, [GENERAL, scratch], metric)
        m["l0"] = l0
        if l0 is not None:
            m["yardstick"] = yard = yardstick(pts, metric, l0)
            pairs = [(scratch, GENERAL)] + [(condition(k, d, hb), c) for k in kinds for c in (GENERAL, scratch)]
            if "finetune_kl" in kinds and "finetune" in kinds:  # the end-to-end fine-tune beside the MSE one
                pairs += [(condition("finetune_kl", d, b), condition("finetune", d, b))
                          for b in cfg.budgets_of("finetune_kl")]
            m["differences"] = [compare(pts, a, b, metric, l0, yard, paired) for a, b in pairs
                                if any(p.condition == a for p in pts)]
            m["gaps"] = {k: gap(cfg, pts, d, k, metric, l0, yard, paired) for k in kinds}
            m["resolvable"] = _resolvable(m["differences"])
            if metric == "ce" and paired is not None:  # the unit of end-to-end fine-tuning papers
                m["recovered"] = {k: r for k in kinds if KINDS[k].init and KINDS[k].data == "domain"
                                  and (r := paired.recovered(GENERAL, {b: condition(k, d, b)
                                                                       for b in cfg.budgets_of(k)}, l0))}
            if "residual" in cfg.conditions:
                m["residual"] = _residual(pts, d, metric)
            m["forgetting"] = {k: _forgetting(cfg, d, k, gen_pts, metric, paired_general) for k in kinds
                               if KINDS[k].parent and KINDS[k].data == "domain"}
        m["frontiers"] = _frontier_points(pts, main + [condition("residual", d)])
        out["metrics"][metric] = m
    return out


def _frontier_points(points: Sequence[RunPoint], conditions: Sequence[str]) -> dict:
    """condition -> seed -> [[l0, value], ...] (measured L0) for the plots."""
    out: dict = {}
    for p in points:
        if p.condition in conditions:
            out.setdefault(p.condition, {}).setdefault(str(p.seed), []).append([p.metrics["l0_measured"], p.metrics])
    return out


def _forgetting(cfg: StudyConfig, d: str, kind: str, gen_pts: list[RunPoint], metric: str,
                paired: Any = None) -> list[dict]:
    rows = []
    for b in cfg.budgets_of(kind):
        c = condition(kind, d, b)
        l0 = comparison_l0(cfg, gen_pts, [GENERAL, c], metric)
        rows.append({"budget": b, **(compare(gen_pts, c, GENERAL, metric, l0, yardstick(gen_pts, metric, l0), paired)
                                     if l0 else {"unavailable": "the fine-tuned and general runs share no L0"})})
    return rows


def _resolvable(differences: list[dict]) -> Optional[dict]:
    """The smallest difference the paired comparisons resolve: the half-width of the paired 95% interval of
    scratch − general (the first comparison) and the range over every paired comparison of the domain."""
    widths = [x["half_width"] for x in differences if x.get("test") == "paired" and math.isfinite(x["half_width"])]
    if not widths:
        return None
    first = differences[0]
    return {"scratch_minus_general": first.get("half_width") if first.get("test") == "paired" else None,
            "min": min(widths), "max": max(widths), "n": len(widths), "label": first.get("label")}


def _residual(points: list[RunPoint], d: str, metric: str) -> dict:
    """The stack general + residual (one point per seed) against the general and scratch frontiers at its L0."""
    stack = [p for p in points if p.condition == condition("residual", d)]
    if not stack:
        return {"unavailable": "no residual run"}
    l0 = float(np.mean([p.metrics["l0"] for p in stack]))
    vals = [p.metrics[metric] for p in stack]
    out: dict = {"l0": l0, "stack": vars(seed_summary(vals)), "values": vals}
    for c in (GENERAL, condition("scratch", d)):
        v = _safe(_values, points, c, metric, l0)
        out[c] = vars(seed_summary(v)) if isinstance(v, np.ndarray) else v
    return out


# ----------------------------------------------------------------------------------------------------------------
# The answer

def _where(cfg: StudyConfig, m: dict) -> str:
    if len(cfg.sparsity) > 1:
        return f"at L0 {m['l0']:.0f}"
    if cfg.sparsity_knob == "k":
        return f"at k {cfg.sparsity[0]:g}: every SAE at most k active latents"
    return f"at {cfg.knob_label} {cfg.sparsity[0]:g}, L0s not matched"


def _diff(m: dict, a: str, b: str) -> dict:
    return next((x for x in m.get("differences", []) if x.get("a") == a and x.get("b") == b), {})


def _headline_metric(dom: dict) -> Optional[str]:
    return next((k for k in METRICS if dom["metrics"].get(k, {}).get("l0") is not None), None)


def _gap_at(m: dict, kind: str, b: int) -> Optional[dict]:
    return next((r for r in (m.get("gaps", {}).get(kind) or {}).get("budgets", []) if r["budget"] == b), None)


def scratch_tokens(cfg: StudyConfig, hooks: dict) -> tuple[float, str]:
    """Tokens of a scratch SAE: ``scratch_tokens``, or with train_to_plateau the mean of those trained (and how)."""
    got = [v["tokens"] for h in hooks.values() for v in (h.get("training") or {}).values()
           if v.get("kind") == "scratch" and v.get("tokens")]
    if not cfg.train_to_plateau or not got:
        return float(cfg.scratch_tokens), ""
    return sum(got) / len(got), " on average, trained to the plateau or one pass"


def answer(cfg: StudyConfig, hooks: dict) -> list[str]:
    """At most five sentences: the bottom line, one per hook (at most three), the tests used."""
    hb, n_ok, n, tests, per_hook = cfg.headline, 0, 0, set(), []
    ft = "finetune" in cfg.conditions
    metric_names = set()
    for hook, h in hooks.items():
        clauses, where = [], ""
        for d, dom in h["findings"].items():
            key = _headline_metric(dom)
            if key is None:
                clauses.append(f"on {d} the conditions share no L0")
                continue
            m, metric_names = dom["metrics"][key], metric_names | {METRICS[key]}
            where = _where(cfg, m)
            sg = _diff(m, condition("scratch", d), GENERAL)
            tests |= {x.get("test") for x in m.get("differences", [])} - {None}
            text = f"on {d}, scratch − general {sg.get('text', 'n/a')}"
            if ft:
                fs = _diff(m, condition("finetune", d, hb), condition("scratch", d))
                n, n_ok = n + 1, n_ok + int(bool(fs) and not (fs.get("is_difference") and fs["diff"] < 0))
                row = _gap_at(m, "finetune", hb)
                text += f", fine-tuned − scratch {fs.get('text', 'n/a')}"
                text += f", gap closed {row['text']}" if row else ""
                controls = [f"{k} {r['text']}" for k in per_budget_kinds(cfg) if k != "finetune"
                            and (r := _gap_at(m, k, hb))]
                text += f" (controls: {'; '.join(controls)})" if controls else ""
            clauses.append(text)
        per_hook.append(f"At {hook} ({', '.join(sorted(metric_names))}, {where}): " + "; ".join(clauses) + ".")
    names = " / ".join(sorted(metric_names)) or "the metrics"
    if ft:
        st, how = scratch_tokens(cfg, hooks)
        first = (f"Fine-tuning the general SAE on {hb:,} domain tokens ({hb / st:.0%} of a scratch SAE's "
                 f"{st:,.0f}{how}) matches or beats the domain SAE trained from scratch in {n_ok} of {n} (hook, "
                 f"domain) cases on {names}.")
    else:
        first = f"The domain SAEs trained from scratch are compared with the general SAE on {names}."
    extra = f" ({len(per_hook) - 3} more hooks in the details)" if len(per_hook) > 3 else ""
    widths = [r["scratch_minus_general"] for h in hooks.values() for dom in h["findings"].values()
              if (r := dom["metrics"].get("ce", {}).get("resolvable")) and r.get("scratch_minus_general") is not None]
    if widths:
        extra += (f"; the smallest CE-loss-score difference the paired test resolves (half-width of the 95% "
                  f"interval of scratch − general) is ±{min(widths):.4f} to ±{max(widths):.4f}")
    last = ("Differences are called by " + " and by ".join(TESTS[t] for t in sorted(tests)) + extra
            + "; the details, every control and every number follow." if tests else "Details follow.")
    return [first] + per_hook[:3] + [last]
