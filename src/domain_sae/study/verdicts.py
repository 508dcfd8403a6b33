"""Paired verdicts: the study's differences and gap fractions between SAEs measured on the same held-out documents,
by :mod:`domain_sae.analysis.paired` (a bootstrap that draws the documents once for every SAE compared, and each
condition's seeds first where it has several).

Inputs are the per-document sums the measurements keep (:meth:`.measure.Measurements.doc_stats`): for explained
variance (``ev``) those of the reconstruction set (``<run>.<set>.recon.npz``), for the CE-loss score (``ce``) those
of the model-pass set (``<run>.<set>.npz``). A condition is one :class:`~domain_sae.analysis.docstats.DocStats` per
seed (one sparsity value: every SAE at that value; TopK SAEs are then at one L0, at most k) or, with a sparsity
ladder, the blend of each seed's ladder at the compared L0 (:func:`~domain_sae.analysis.docstats.at_l0`: log-L0
interpolation, never extrapolated). A comparison is made only when every SAE in it has its sums on the set (else
the findings fall back to the test over seeds, :mod:`.findings`, and say so).

- ``difference(a, b, metric, l0)``: A - B with the percentile interval of the paired replicates (level 0.95); "a
  difference" when 0 lies outside it; ``half_width`` is the smallest difference this pair of measurements can
  resolve (:func:`~domain_sae.analysis.paired.smallest_resolvable_difference`).
- ``gap(general, scratch, {budget: candidate}, metric, l0)``: (F - G) / (S - G) per budget with the paired interval
  (:func:`~domain_sae.analysis.paired.paired_gap_closed`), ``defined`` only when S - G is a paired difference.
- ``recovered(general, {budget: candidate}, l0)``: the share of the general SAE's CE-loss degradation that the
  candidate recovers, the unit of end-to-end fine-tuning papers (Karvonen et al. 2025):

      (CE_G - CE_F) / (CE_G - CE_clean) = (score_F - score_G) / (1 - score_G)

  (score = CE-loss score), i.e. the gap closed towards a "perfect SAE" C whose spliced CE is the clean CE: C is G's
  per-document sums with the SAE's CE replaced by the clean CE, so ``paired_gap_closed(G, C, F)`` gives it with
  the same document draws.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from ..analysis.docstats import LM, SAE, Blend, DocStats, at_l0
from ..evaluation.lm_metrics import CLEAN
from ..evaluation.uncertainty import SumKey
from ..analysis.errors import AnalysisError
from ..analysis.paired import paired_bootstrap, paired_gap_closed
from ..analysis.stats import ExtrapolationError, smallest_budget
from .config import StudyConfig

METRIC_KEYS = {"ev": ("recon", "metrics/explained_variance"), "ce": ("lm", "metrics/ce_loss_score")}
TEST = "paired"


class PairedVerdicts:
    """Paired comparisons of the runs ``runs`` (with their measurements ``meas``) on held-out set ``eval_set``."""

    def __init__(self, cfg: StudyConfig, meas: Any, runs: Sequence[Any], eval_set: str):
        self.cfg, self.meas, self.set = cfg, meas, eval_set
        self.by_condition: dict[str, dict[int, list]] = {}
        for r in runs:
            self.by_condition.setdefault(r.condition, {}).setdefault(r.seed, []).append(r)
        self.n_boot, self.seed = cfg.n_paired_bootstrap, cfg.seeds[0]
        self._stats: dict = {}  # (run, kind) -> DocStats, loaded once (its bootstrap replicates are cached on it)

    def _doc_stats(self, run: Any, kind: str) -> Optional[DocStats]:
        if (run, kind) not in self._stats:
            self._stats[run, kind] = self.meas.doc_stats(run, self.set, kind)
        return self._stats[run, kind]

    def sides(self, condition: str, metric: str, l0: float) -> Optional[list]:
        """One DocStats (or blend at ``l0``) per seed of ``condition``; None when a run lacks its sums on the set
        or the ladder does not reach ``l0``."""
        kind, _ = METRIC_KEYS[metric]
        out = []
        for seed, runs in sorted(self.by_condition.get(condition, {}).items()):
            ladder = []
            for r in runs:
                stats, rec = self._doc_stats(r, kind), self.meas.get(r)["recon"].get(self.set)
                if stats is None or rec is None:
                    return None
                ladder.append((float(rec["l0"]), stats))
            if len(self.cfg.sparsity) == 1:
                out.append(ladder[0][1])
                continue
            try:
                out.append(at_l0(ladder, l0, name=condition))
            except (ExtrapolationError, AnalysisError):
                return None
        return out or None

    def difference(self, a: str, b: str, metric: str, l0: float) -> Optional[dict]:
        sa, sb = self.sides(a, metric, l0), self.sides(b, metric, l0)
        if sa is None or sb is None:
            return None
        try:
            r = paired_bootstrap(sa, sb, METRIC_KEYS[metric][1], n_boot=self.n_boot, seed=self.seed)
        except AnalysisError:
            return None
        verdict = "a difference" if r.is_difference else "not a difference"
        d = r.to_dict()
        return {**d, "a": a, "b": b, "mean_a": d["a"], "mean_b": d["b"], "l0": float(l0), "test": TEST,
                "label": r.test, "text": f"{r.diff:+.4f} [{r.low:+.4f}, {r.high:+.4f}]: {verdict}"}

    def gap(self, general: str, scratch: str, candidates: Mapping[int, str], metric: str, l0: float) -> Optional[dict]:
        """Per budget the paired fraction of the gap closed; None when the sums are missing for general/scratch."""
        g, s = self.sides(general, metric, l0), self.sides(scratch, metric, l0)
        if g is None or s is None:
            return None
        rows, label = [], None
        for budget in sorted(candidates):
            c = self.sides(candidates[budget], metric, l0)
            if c is None:
                continue
            try:
                pg = paired_gap_closed(g, s, c, METRIC_KEYS[metric][1], n_boot=self.n_boot, seed=self.seed)
            except AnalysisError:
                continue
            label = pg.test
            rows.append({"budget": budget, "fraction": pg.fraction, "low": pg.low, "high": pg.high,
                         "defined": pg.defined, "text": pg.format().replace(f" ({pg.test})", "") if pg.defined
                         else "undefined (scratch − general is not a paired difference)",
                         "gap": pg.gap.to_dict()})
        if not rows:
            return None
        out: dict = {"rows": rows, "label": label, "test": TEST}
        if all(r["defined"] for r in rows):
            b = [r["budget"] for r in rows]
            out["smallest_budget"] = {}
            for t in (0.5, 0.9):
                for key, vals in ((f"{t:g}", [r["fraction"] for r in rows]),
                                  (f"{t:g} (lower bound)", [r["low"] for r in rows])):
                    v = smallest_budget(b, vals, t)
                    out["smallest_budget"][key] = {"target": v.target, "budget": v.budget, "status": v.status,
                                                   "text": v.format()}
        else:
            out["smallest_budget"] = None
            out["why_no_budget"] = "scratch − general is not a paired difference at this L0"
        return out

    def recovered(self, general: str, candidates: Mapping[int, str], l0: float) -> Optional[dict]:
        """Per budget the paired share of the general SAE's CE-loss degradation the candidate recovers (module
        docstring); None without the model-pass sums of the general SAE."""
        g = self.sides(general, "ce", l0)
        if g is None:
            return None
        perfect = [_clean(side) for side in g]
        rows = []
        for budget in sorted(candidates):
            c = self.sides(candidates[budget], "ce", l0)
            if c is None:
                continue
            try:
                pg = paired_gap_closed(g, perfect, c, METRIC_KEYS["ce"][1], n_boot=self.n_boot, seed=self.seed)
            except AnalysisError:
                continue
            rows.append({"budget": budget, "fraction": pg.fraction, "low": pg.low, "high": pg.high,
                         "text": f"{100 * pg.fraction:.0f}% [{100 * pg.low:.0f}%, {100 * pg.high:.0f}%]",
                         "label": pg.test})
        return {"rows": rows, "formula": "(CE_general - CE_candidate) / (CE_general - CE_clean)"} if rows else None


def _clean(side):
    """A side whose spliced-in CE is the clean CE (a perfect SAE), on the same documents."""
    if isinstance(side, Blend):
        return Blend(tuple((c, _clean(s)) for c, s in side.parts))
    sums = dict(side.sums)
    sums[SumKey(LM, "ce", SAE)] = sums[SumKey(LM, "ce", CLEAN)]
    if SumKey(LM, "kl", SAE) in sums:
        sums[SumKey(LM, "kl", SAE)] = sums[SumKey(LM, "kl", SAE)] * 0
    return DocStats(side.doc_ids, sums)
