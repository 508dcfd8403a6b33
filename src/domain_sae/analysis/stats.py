"""Statistics of the study: metrics at matched sparsity, seed spread, bootstrap intervals, "is this a difference",
the fraction of the general-to-scratch gap closed and the smallest budget that closes a given fraction.

Matched sparsity (the frontier)
    A condition (e.g. "chat scratch") is trained at several L1 coefficients; each run gives a point
    ``(L0_j, m_j)`` (and optionally a per-document standard error ``se_j`` of ``m_j``). Sorted by L0, the frontier is
    the piecewise-linear interpolant in log L0: for ``L0_a <= t <= L0_b`` (neighbouring points)

        w    = (ln t - ln L0_a) / (ln L0_b - ln L0_a)
        m(t) = (1 - w) m_a + w m_b
        se(t) = sqrt((1 - w)^2 se_a^2 + w^2 se_b^2)          (the two runs are independent)

    Log L0 because EV and CE score change roughly linearly in log L0 over the range SAEs are trained at. Points with
    the same L0 are averaged first (se: sqrt(sum se^2) / n). A target outside ``[min L0, max L0]`` raises
    :class:`ExtrapolationError`: the study never extrapolates a frontier; it compares conditions only on the common
    range ``[max_c min L0_c, min_c max L0_c]`` (:func:`common_l0_range`).

Seeds
    ``seed_summary``: mean, sample std (ddof 1), n and sem = std / sqrt(n) over seeds. ``bootstrap_ci``: percentile
    interval of a statistic over ``n_boot`` resamples with replacement (fixed generator seed, so reports are
    reproducible). With 3 seeds a bootstrap has only 10 distinct resamples: report it beside mean +- std, not alone.

Is this a difference (:func:`difference_test`)
    Conditions A and B with per-seed values a_1..a_nA, b_1..b_nB, each evaluated on the same held-out documents with
    per-document standard errors (the evaluation-set noise, common to all seeds of a condition):

        D   = mean(a) - mean(b)
        V   = s_a^2 / n_A + s_b^2 / n_B + e^2,   e^2 = se_doc_A^2 + se_doc_B^2   (or the paired se of A - B)
        df  = V^2 / ((s_a^2/n_A)^2 / (n_A - 1) + (s_b^2/n_B)^2 / (n_B - 1))   (Welch-Satterthwaite; the
              document term counts as a known variance, with infinitely many degrees of freedom)
        difference  <=>  |D| > t_{1 - alpha/2, df} sqrt(V)   and   |D| > max(s_a, s_b)

    The second condition is the study's rule that a difference must exceed the seed-to-seed spread itself. Adding
    both document variances ignores that two conditions scored on the same documents err together, so it is
    conservative; pass ``doc_se_diff`` (the paired per-document se of A - B) when it is known. Where the
    per-document sums of both conditions are at hand, :func:`.paired.paired_bootstrap` is the paired test (one
    document draw for both, seeds resampled first) and :func:`.paired.paired_gap_closed` the paired gap fraction.

Gap closed
    With G the general SAE, S the domain SAE from scratch and F a fine-tuned SAE, all at the same L0 on the domain's
    held-out set: ``gap_closed = (F - G) / (S - G)`` (0: no better than general, 1: as good as scratch; > 1 better).
    Its interval resamples the seeds of G, S and F independently (bootstrap of the ratio of means). When S - G is not
    itself a difference (:func:`difference_test`), there is no gap and the fraction is reported as undefined.

Smallest budget (:func:`smallest_budget`)
    Budgets b_1 < ... < b_k with fractions f_1..f_k: the first j with f_j >= target; the crossing is interpolated in
    log budget between b_{j-1} and b_j, ``ln b* = ln b_{j-1} + (target - f_{j-1}) / (f_j - f_{j-1}) (ln b_j -
    ln b_{j-1})``. Reached at b_1 already: "at most b_1" (nothing below b_1 was measured). Never reached: "none".

Per-document standard error of a ratio metric (:func:`jackknife_ratio_se`)
    Metrics over tokens are ratios of per-document sums (EV = 1 - sum SSE / sum SST, CE = sum nll / sum count).
    Delete-one-document jackknife: theta_(-d) = (N - n_d) / (D - d_d), se = sqrt((K - 1) / K sum_d (theta_(-d) -
    mean theta_(-))^2) over K documents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
from scipy import stats as sps

from ..errors import UserError

__all__ = ["ExtrapolationError", "Frontier", "interpolate_at_l0", "common_l0_range", "l0_grid", "matched_values",
           "SeedSummary", "seed_summary", "bootstrap_ci", "DifferenceTest", "difference_test", "gap_closed",
           "GapClosed", "gap_closed_interval", "BudgetCrossing", "smallest_budget", "jackknife_ratio_se"]


class ExtrapolationError(UserError):
    """A metric was asked at an L0 outside the range a frontier covers."""


# ----------------------------------------------------------------------------------------------------------------
# Frontiers at matched L0

@dataclass(frozen=True)
class Frontier:
    """Points ``(l0, value, se)`` of one condition (one seed), sorted by L0 with duplicate L0s averaged."""

    l0: tuple[float, ...]
    value: tuple[float, ...]
    se: Optional[tuple[float, ...]] = None
    name: str = ""

    @classmethod
    def from_points(cls, l0s: Sequence[float], values: Sequence[float], ses: Optional[Sequence[float]] = None,
                    name: str = "") -> "Frontier":
        l0 = np.asarray(l0s, dtype=np.float64)
        val = np.asarray(values, dtype=np.float64)
        se = None if ses is None else np.asarray(ses, dtype=np.float64)
        if l0.ndim != 1 or len(l0) == 0 or val.shape != l0.shape or (se is not None and se.shape != l0.shape):
            raise ValueError(f"A frontier needs equal-length 1-d L0s and values (got {l0.shape}, {val.shape}).")
        if not (np.all(np.isfinite(l0)) and np.all(l0 > 0)):
            raise UserError(f"Frontier {name!r}: every L0 must be positive and finite (got {l0.tolist()}); an SAE "
                            f"with L0 = 0 (no latent fires) cannot be placed on a log-L0 frontier.")
        uniq = np.unique(l0)
        v = np.array([val[l0 == u].mean() for u in uniq])
        s = None if se is None else np.array([math.sqrt(float((se[l0 == u] ** 2).sum())) / int((l0 == u).sum())
                                              for u in uniq])
        return cls(tuple(uniq.tolist()), tuple(v.tolist()), None if s is None else tuple(s.tolist()), name)

    @property
    def l0_range(self) -> tuple[float, float]:
        return self.l0[0], self.l0[-1]

    def at(self, target: float) -> tuple[float, float]:
        """``(m(t), se(t))`` at L0 ``t`` (se is NaN without per-point errors); see the module docstring."""
        lo, hi = self.l0_range
        t = float(target)
        tol = 1e-9 * max(1.0, hi)
        if not (lo - tol <= t <= hi + tol):
            side = "below" if t < lo else "above"
            raise ExtrapolationError(
                f"L0 = {t:.4g} is {side} the range [{lo:.4g}, {hi:.4g}] covered by {self.name or 'this frontier'} "
                f"({len(self.l0)} L1 coefficients); the study does not extrapolate. Compare at an L0 inside the "
                f"range, or add an L1 coefficient giving L0 {'<=' if t < lo else '>='} {t:.4g}.")
        t = min(max(t, lo), hi)
        j = int(np.searchsorted(self.l0, t, side="left"))
        se = self.se if self.se is not None else (math.nan,) * len(self.l0)
        if j < len(self.l0) and self.l0[j] == t:
            return self.value[j], se[j]
        a, b = j - 1, j
        w = (math.log(t) - math.log(self.l0[a])) / (math.log(self.l0[b]) - math.log(self.l0[a]))
        value = (1 - w) * self.value[a] + w * self.value[b]
        return value, math.sqrt((1 - w) ** 2 * se[a] ** 2 + w ** 2 * se[b] ** 2)


def interpolate_at_l0(l0s: Sequence[float], values: Sequence[float], target: float,
                      ses: Optional[Sequence[float]] = None, name: str = "") -> tuple[float, float]:
    """The metric (and its se) of the frontier through ``(l0s, values)`` at L0 ``target`` (module docstring)."""
    return Frontier.from_points(l0s, values, ses, name).at(target)


def common_l0_range(frontiers: Sequence[Frontier]) -> tuple[float, float]:
    """``[max_c min L0_c, min_c max L0_c]``: the L0s every frontier covers; :class:`ExtrapolationError` if none."""
    lo = max(f.l0_range[0] for f in frontiers)
    hi = min(f.l0_range[1] for f in frontiers)
    if lo > hi:
        spans = ", ".join(f"{f.name or i}: [{f.l0_range[0]:.3g}, {f.l0_range[1]:.3g}]" for i, f in enumerate(frontiers))
        raise ExtrapolationError(f"The frontiers share no L0 range ({spans}); widen the L1 ladder so the conditions "
                                 f"overlap in L0.")
    return lo, hi


def l0_grid(lo: float, hi: float, n: int) -> list[float]:
    """``n`` L0 values log-spaced from ``lo`` to ``hi`` (both included; one value, the geometric mean, if n = 1)."""
    if n == 1:
        return [math.sqrt(lo * hi)]
    return np.exp(np.linspace(math.log(lo), math.log(hi), n)).tolist()


def matched_values(frontiers: Sequence[Frontier], target: float) -> tuple[np.ndarray, np.ndarray]:
    """Values and ses of every frontier (one per seed) at L0 ``target``: arrays of shape [n_seeds]."""
    pairs = [f.at(target) for f in frontiers]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


# ----------------------------------------------------------------------------------------------------------------
# Seeds and intervals

@dataclass(frozen=True)
class SeedSummary:
    mean: float
    std: float
    n: int
    sem: float

    def format(self, digits: int = 3) -> str:
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f} (n={self.n})"


def seed_summary(values: Sequence[float]) -> SeedSummary:
    """Mean, sample std (ddof 1; 0 for one seed), n and sem = std / sqrt(n) of per-seed values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("seed_summary needs at least one value.")
    std = float(x.std(ddof=1)) if x.size > 1 else 0.0
    return SeedSummary(float(x.mean()), std, int(x.size), std / math.sqrt(x.size))


def bootstrap_ci(values: Sequence[float], statistic: Callable[[np.ndarray], float] = np.mean, *,
                 n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval ``(q_{(1-level)/2}, q_{(1+level)/2})`` of ``statistic`` over ``n_boot``
    resamples (with replacement, same size) drawn by ``numpy.random.default_rng(seed)``."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value.")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    try:  # numpy reductions take axis=1 (one pass); any other statistic is applied resample by resample
        boots = np.asarray(statistic(x[idx], axis=1), dtype=np.float64)
    except TypeError:
        boots = np.array([statistic(x[i]) for i in idx])
    a = (1 - level) / 2
    return float(np.quantile(boots, a)), float(np.quantile(boots, 1 - a))


# ----------------------------------------------------------------------------------------------------------------
# Is this a difference

@dataclass(frozen=True)
class DifferenceTest:
    diff: float
    se: float
    df: float
    threshold: float
    seed_spread: float
    is_difference: bool
    reason: str

    def format(self, digits: int = 3) -> str:
        verdict = "a difference" if self.is_difference else "not a difference"
        return f"{self.diff:+.{digits}f} (± {self.threshold:.{digits}f}: {verdict})"


def _doc_var(se) -> float:
    if se is None:
        return 0.0
    arr = np.asarray(se, dtype=np.float64)
    return float(np.nanmean(arr)) ** 2 if arr.size else 0.0


def difference_test(a: Sequence[float], b: Sequence[float], *, doc_se_a=None, doc_se_b=None,
                    doc_se_diff: Optional[float] = None, level: float = 0.95) -> DifferenceTest:
    """Is mean(a) - mean(b) a difference? Welch test with per-document errors added (module docstring).

    ``doc_se_a`` / ``doc_se_b``: a condition's per-document se (a scalar, or one per seed: their mean is used);
    ``doc_se_diff`` replaces both by the paired se of A - B. Each side needs at least 2 seeds."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff = float(x.mean() - y.mean())
    if x.size < 2 or y.size < 2:
        return DifferenceTest(diff, math.nan, math.nan, math.nan, math.nan, False,
                              f"needs at least 2 seeds per condition (got {x.size} and {y.size})")
    va, vb = float(x.var(ddof=1)) / x.size, float(y.var(ddof=1)) / y.size
    doc = float(doc_se_diff) ** 2 if doc_se_diff is not None else _doc_var(doc_se_a) + _doc_var(doc_se_b)
    var = va + vb + doc
    spread = max(float(x.std(ddof=1)), float(y.std(ddof=1)))
    if var == 0.0:
        return DifferenceTest(diff, 0.0, math.inf, 0.0, spread, diff != 0.0,
                              "no spread at all" if diff == 0.0 else "no spread and a nonzero difference")
    denom = va ** 2 / (x.size - 1) + vb ** 2 / (y.size - 1)  # the known document term adds nothing here
    df = var ** 2 / denom if denom > 0 else math.inf
    tq = float(sps.norm.ppf(0.5 + level / 2)) if math.isinf(df) else float(sps.t.ppf(0.5 + level / 2, df))
    se = math.sqrt(var)
    thr = max(tq * se, spread)
    ok = abs(diff) > thr
    reason = (f"|{diff:.4g}| {'>' if ok else '<='} max(t*se = {tq * se:.4g}, seed spread = {spread:.4g})")
    return DifferenceTest(diff, se, df, thr, spread, ok, reason)


# ----------------------------------------------------------------------------------------------------------------
# Gap closed and budgets

def gap_closed(general: float, scratch: float, candidate: float) -> float:
    """``(candidate - general) / (scratch - general)``; NaN when scratch == general."""
    gap = scratch - general
    return (candidate - general) / gap if gap != 0 else math.nan


@dataclass(frozen=True)
class GapClosed:
    fraction: float
    low: float
    high: float
    gap: DifferenceTest
    defined: bool

    def format(self) -> str:
        if not self.defined:
            return "undefined (scratch is not better than general beyond the seed spread)"
        return f"{100 * self.fraction:.0f}% [{100 * self.low:.0f}%, {100 * self.high:.0f}%]"


def gap_closed_interval(general: Sequence[float], scratch: Sequence[float], candidate: Sequence[float], *,
                        doc_se_gap=None, n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> GapClosed:
    """Fraction of the gap closed from per-seed values (point estimate from the means) with a bootstrap interval
    resampling each condition's seeds independently; ``defined`` only when scratch - general is a difference
    (``doc_se_gap``: the per-document se of that difference, if known)."""
    g, s, c = (np.asarray(v, dtype=np.float64) for v in (general, scratch, candidate))
    test = difference_test(s, g, doc_se_diff=doc_se_gap)
    point = gap_closed(g.mean(), s.mean(), c.mean())
    rng = np.random.default_rng(seed)
    gi = rng.integers(0, g.size, size=(n_boot, g.size))
    si = rng.integers(0, s.size, size=(n_boot, s.size))
    ci = rng.integers(0, c.size, size=(n_boot, c.size))
    gm, sm, cm = g[gi].mean(1), s[si].mean(1), c[ci].mean(1)
    ok = np.abs(sm - gm) > 0
    boots = (cm[ok] - gm[ok]) / (sm[ok] - gm[ok])
    a = (1 - level) / 2
    low, high = (float(np.quantile(boots, a)), float(np.quantile(boots, 1 - a))) if boots.size else (math.nan,) * 2
    return GapClosed(point, low, high, test, bool(test.is_difference and math.isfinite(point)))


@dataclass(frozen=True)
class BudgetCrossing:
    target: float
    budget: Optional[float]
    status: str          # "reached" | "at_or_below_first" | "not_reached"

    def format(self) -> str:
        if self.status == "not_reached":
            return f"none of the budgets closes {100 * self.target:.0f}%"
        if self.status == "at_or_below_first":
            return f"at most {self.budget:,.0f} tokens (the smallest budget measured)"
        return f"about {self.budget:,.0f} tokens"


def smallest_budget(budgets: Sequence[float], fractions: Sequence[float], target: float) -> BudgetCrossing:
    """The smallest budget whose gap-closed fraction reaches ``target`` (log-interpolated; module docstring)."""
    b = np.asarray(budgets, dtype=np.float64)
    f = np.asarray(fractions, dtype=np.float64)
    if b.shape != f.shape or b.size == 0 or np.any(np.diff(b) <= 0) or np.any(b <= 0):
        raise ValueError("budgets must be positive, strictly increasing and match the fractions.")
    hits = np.nonzero(f >= target)[0]
    if hits.size == 0:
        return BudgetCrossing(target, None, "not_reached")
    j = int(hits[0])
    if j == 0:
        return BudgetCrossing(target, float(b[0]), "at_or_below_first")
    w = (target - f[j - 1]) / (f[j] - f[j - 1])
    return BudgetCrossing(target, float(math.exp(math.log(b[j - 1]) + w * (math.log(b[j]) - math.log(b[j - 1])))),
                          "reached")


def jackknife_ratio_se(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """Delete-one-document jackknife se of ``sum(num) / sum(den)`` (module docstring); NaN for < 2 documents."""
    n = np.asarray(numerators, dtype=np.float64)
    d = np.asarray(denominators, dtype=np.float64)
    k = n.size
    if k < 2:
        return math.nan
    theta = (n.sum() - n) / (d.sum() - d)
    return float(math.sqrt((k - 1) / k * float(((theta - theta.mean()) ** 2).sum())))
