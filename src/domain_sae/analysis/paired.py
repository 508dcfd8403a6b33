"""Paired comparisons of SAEs measured on the same held-out documents: a bootstrap over documents that draws the
documents once for every SAE compared (and, where a condition has several seeds, the seeds first), the fraction of
a gap closed with the same draws, and the smallest difference such a comparison resolves. Inputs: per-document
sums (:class:`.docstats.DocStats`, or a :class:`.docstats.Blend` of runs at a matched L0), one per seed.

Paired bootstrap (:func:`paired_bootstrap`)
    Condition A has seeds 1..n_A, B has 1..n_B, all on the same D documents; m(T) is the metric of the totals
    T = Σ_d S_d (:mod:`.docstats`). The difference is

        Δ = (1/n_A) Σ_i m(T_Ai) - (1/n_B) Σ_j m(T_Bj).

    Replicate r = 1..R draws document weights w_rd ~ Multinomial(D, 1/D) ONCE and applies them to every SAE of both
    conditions; with ``seeds=True`` (hierarchical: seeds, then documents) it first draws seed indices i*_r1..i*_rnA
    from 1..n_A and j*_r1..j*_rnB from 1..n_B with replacement (independently, or the same indices for both with
    ``pair_seeds``, for conditions whose seed i started from the same run):

        Δ_r = (1/n_A) Σ_k m(Σ_d w_rd S_{A i*_rk, d}) - (1/n_B) Σ_k m(Σ_d w_rd S_{B j*_rk, d}).

    Without ``seeds`` every replicate uses all seeds (only the evaluation documents vary). Over the finite Δ_r:

        se          = std_r Δ_r  (ddof 1)
        [low, high] = [q_{(1-level)/2}, q_{(1+level)/2}] of the Δ_r           (percentile interval)
        p           = min(1, 2 min(1 + #{Δ_r <= 0}, 1 + #{Δ_r >= 0}) / (R + 1))   (two-sided bootstrap fraction)

    p is about the smallest 1 - level at which the percentile interval excludes 0; the +1s keep it >= 2 / (R + 1).
    "A difference" means 0 lies outside [low, high]. The shared document draw is what pairs: documents differ in
    difficulty and every SAE's metric moves with them, so in Δ_r the shared part cancels. ``paired=False`` draws
    independent weights for A and B (what treating the two measurements as independent amounts to), to show what
    pairing buys. With n seeds a seed resample has only C(2n - 1, n) distinct draws (10 for 3 seeds).
    Cost: one [R, D] x [D, k] product per SAE and sum (k = d_in for the reconstruction sum dx), so EV on 1,000
    documents at d_in 576 and R = 10,000 is about 6 GFLOP per SAE; CE metrics are scalars per document and cheap.

Gap closed (:func:`paired_gap_closed`)
    General G, domain scratch S and a candidate F (e.g. fine-tuned) on the same documents: the point fraction is
    :func:`.stats.gap_closed` of the seed means, (F - G) / (S - G); each replicate draws the documents once for all
    three (and each condition's seeds independently) and gives (F_r - G_r) / (S_r - G_r) (replicates with
    S_r = G_r dropped); the interval is the percentile interval of those. The fraction is ``defined`` only when
    S - G is itself a paired difference (0 outside its interval, same replicates).

Smallest resolvable difference (:func:`smallest_resolvable_difference`)
    The half-width (high - low) / 2 of the paired interval of a pair: a difference smaller than it cannot be
    declared (the interval around it contains 0); detecting a true difference with 80% power takes about
    (z_0.975 + z_0.8) / z_0.975 = 1.43 times it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..evaluation.uncertainty import bootstrap_weights
from .docstats import Metric, Side, check_pairing, metric_function, seeds_of, side_values
from .errors import AnalysisError
from .stats import gap_closed

__all__ = ["PairedDifference", "paired_replicates", "paired_bootstrap", "PairedGap", "paired_gap_closed",
           "smallest_resolvable_difference"]


def _draws(conds: Sequence[list[Side]], metric: Metric, n_boot: int, seed: int, seeds: bool,
           pair_seeds: bool = False, paired: bool = True) -> tuple[list[float], list[np.ndarray], int]:
    """Per condition: the point value (mean over seeds) and the [R] replicates (module docstring); and D."""
    if n_boot < 2:
        raise AnalysisError(f"n_boot must be at least 2 (got {n_boot})")
    if pair_seeds and len({len(c) for c in conds}) != 1:
        raise AnalysisError(f"pair_seeds needs as many seeds in every condition (got {[len(c) for c in conds]})")
    fn, group = metric_function(metric)
    n_docs = check_pairing([s for c in conds for s in c], group).size
    rng = np.random.default_rng([seed, 1])
    idx = None
    points, reps = [], []
    shared = bootstrap_weights(n_docs, n_boot, seed)
    for k, sides in enumerate(conds):
        points.append(float(np.mean([float(side_values(s, fn, group, None)) for s in sides])))
        w = shared if paired or k == 0 else bootstrap_weights(n_docs, n_boot, seed + k)
        key = (metric, n_boot, seed if paired or k == 0 else seed + k) if isinstance(metric, str) else None
        m = np.stack([side_values(s, fn, group, w, key).numpy() for s in sides], 1)     # [R, n_seeds]
        if seeds and max(len(c) for c in conds) > 1:
            idx = idx if pair_seeds and idx is not None else rng.integers(0, len(sides), size=(n_boot, len(sides)))
            m = np.take_along_axis(m, idx, 1)
        reps.append(m.mean(1))
    return points, reps, n_docs


def _label(n_docs: int, n_seeds: Sequence[int], n_boot: int, seeds: bool, pair_seeds: bool, paired: bool) -> str:
    over = f"{n_docs} documents"
    if seeds and max(n_seeds) > 1:
        over = f"seeds ({' vs '.join(map(str, n_seeds))}{', paired' if pair_seeds else ''}), then {over}"
    extra = "" if paired else ", independent draws per SAE"
    return f"{'paired' if paired else 'unpaired'} bootstrap over {over} ({n_boot} replicates{extra})"


@dataclass(frozen=True)
class PairedDifference:
    """Δ = A - B of ``metric`` (``a``, ``b``: the two seed means) with its bootstrap interval, se and two-sided
    fraction p (module docstring); ``test`` names the bootstrap that gave them (the report prints it beside each
    verdict)."""

    metric: str
    diff: float
    a: float
    b: float
    low: float
    high: float
    se: float
    p_value: float
    level: float
    test: str
    n_docs: int
    n_seeds_a: int
    n_seeds_b: int
    n_boot: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def is_difference(self) -> bool:
        return bool(self.low > 0 or self.high < 0)

    def format(self, digits: int = 4) -> str:
        verdict = "a difference" if self.is_difference else "not a difference"
        return (f"{self.diff:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}], p = {self.p_value:.3g}: "
                f"{verdict} ({self.test})")

    def to_dict(self) -> dict:
        return {"metric": self.metric, "diff": self.diff, "a": self.a, "b": self.b, "low": self.low,
                "high": self.high, "half_width": self.half_width, "se": self.se, "p_value": self.p_value,
                "level": self.level, "is_difference": self.is_difference, "test": self.test,
                "n_docs": self.n_docs, "n_seeds_a": self.n_seeds_a, "n_seeds_b": self.n_seeds_b,
                "n_boot": self.n_boot, "text": self.format()}


def _name(metric: Metric) -> str:
    return metric if isinstance(metric, str) else getattr(metric, "__name__", "metric")


def _summary(metric: Metric, a: float, b: float, reps: np.ndarray, level: float, test: str, n_docs: int,
             n_a: int, n_b: int, n_boot: int) -> PairedDifference:
    r = reps[np.isfinite(reps)]
    if r.size < 2:
        return PairedDifference(_name(metric), a - b, a, b, math.nan, math.nan, math.nan, math.nan, level, test,
                                n_docs, n_a, n_b, n_boot)
    q = (1 - level) / 2
    low, high = (float(x) for x in np.quantile(r, [q, 1 - q]))
    p = min(1.0, 2 * min(1 + int((r <= 0).sum()), 1 + int((r >= 0).sum())) / (r.size + 1))
    return PairedDifference(_name(metric), a - b, a, b, low, high, float(r.std(ddof=1)), p, level, test, n_docs,
                            n_a, n_b, n_boot)


def paired_replicates(a, b, metric: Metric = "metrics/ce_loss_score", *, n_boot: int = 10_000, seed: int = 0,
                      seeds: bool = True, pair_seeds: bool = False, paired: bool = True) -> tuple[float, np.ndarray]:
    """``(Δ, Δ_r [R])``: the point difference of ``metric`` between conditions ``a`` and ``b`` (each a DocStats or
    Blend, or a sequence of them, one per seed) and its bootstrap replicates (module docstring). Document weights:
    :func:`..evaluation.uncertainty.bootstrap_weights` with ``seed`` (``seed + 1`` for B when ``paired=False``);
    seed draws: ``numpy.random.default_rng([seed, 1])``."""
    (pa, pb), (ra, rb), _ = _draws([seeds_of(a), seeds_of(b)], metric, n_boot, seed, seeds, pair_seeds, paired)
    return pa - pb, ra - rb


def paired_bootstrap(a, b, metric: Metric = "metrics/ce_loss_score", *, n_boot: int = 10_000, level: float = 0.95,
                     seed: int = 0, seeds: bool = True, pair_seeds: bool = False,
                     paired: bool = True) -> PairedDifference:
    """A - B of ``metric`` (a SPEC metric name, e.g. ``metrics/ce_loss_score``, ``metrics/explained_variance``,
    ``metrics/kl_div_score``, or a function of the totals) with its paired-bootstrap interval, se and p: see
    :func:`paired_replicates` and the module docstring."""
    sa, sb = seeds_of(a), seeds_of(b)
    (pa, pb), (ra, rb), n_docs = _draws([sa, sb], metric, n_boot, seed, seeds, pair_seeds, paired)
    test = _label(n_docs, [len(sa), len(sb)], n_boot, seeds, pair_seeds, paired)
    return _summary(metric, pa, pb, ra - rb, level, test, n_docs, len(sa), len(sb), n_boot)


def smallest_resolvable_difference(a, b, metric: Metric = "metrics/ce_loss_score", *, n_boot: int = 10_000,
                                   level: float = 0.95, seed: int = 0, seeds: bool = True) -> float:
    """Half-width of the paired ``level`` interval of A - B (module docstring): the smallest ``metric`` difference
    this pair of measurements can resolve."""
    return paired_bootstrap(a, b, metric, n_boot=n_boot, level=level, seed=seed, seeds=seeds).half_width


@dataclass(frozen=True)
class PairedGap:
    """Fraction of the general -> scratch gap closed by a candidate, with its paired interval; ``gap`` is the
    paired test of scratch - general that decides whether the fraction is ``defined``."""

    fraction: float
    low: float
    high: float
    gap: PairedDifference
    defined: bool
    test: str

    def format(self) -> str:
        if not self.defined:
            return f"undefined (scratch - general is not a paired difference: {self.gap.format()})"
        return f"{100 * self.fraction:.0f}% [{100 * self.low:.0f}%, {100 * self.high:.0f}%] ({self.test})"

    def to_dict(self) -> dict:
        return {"fraction": self.fraction, "low": self.low, "high": self.high, "defined": self.defined,
                "gap": self.gap.to_dict(), "test": self.test, "text": self.format()}


def paired_gap_closed(general, scratch, candidate, metric: Metric = "metrics/ce_loss_score", *,
                      n_boot: int = 10_000, level: float = 0.95, seed: int = 0, seeds: bool = True) -> PairedGap:
    """(F - G) / (S - G) with one document draw per replicate for all three conditions (module docstring)."""
    conds = [seeds_of(x) for x in (general, scratch, candidate)]
    (g, s, c), (gr, sr, cr), n_docs = _draws(conds, metric, n_boot, seed, seeds)
    n_seeds = [len(x) for x in conds]
    test = _label(n_docs, n_seeds, n_boot, seeds, False, True)
    gap = _summary(metric, s, g, sr - gr, level, test, n_docs, n_seeds[1], n_seeds[0], n_boot)
    ok = np.isfinite(sr - gr) & np.isfinite(cr - gr) & (sr != gr)
    fr = (cr[ok] - gr[ok]) / (sr[ok] - gr[ok])
    q = (1 - level) / 2
    low, high = (float(x) for x in np.quantile(fr, [q, 1 - q])) if fr.size >= 2 else (math.nan, math.nan)
    point = gap_closed(g, s, c)
    return PairedGap(point, low, high, gap, bool(gap.is_difference and math.isfinite(point)), test)
