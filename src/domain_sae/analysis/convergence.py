"""Is an SAE trained? The plateau rule for held-out explained variance against tokens, the stop decision of a
training loop, and the seed-to-seed dictionary overlap at the end.

Plateau (:func:`plateau_slope`)
    Checkpoints (t_i, EV_i) of one run, t_i = training tokens seen, EV_i = held-out explained variance. With
    t_max = max_i t_i, the last doubling is the window W = {i : t_i >= t_max / 2} (both ends included). The slope
    per doubling is the least-squares slope of EV on log2 t over W:

        x_i = log2 t_i,   slope = Σ_W (x_i - x̄)(EV_i - EV̄) / Σ_W (x_i - x̄)²      (x̄, EV̄: means over W)

    i.e. the EV gained per doubling of tokens near the end of the run. It is defined only when W has >= 2 distinct
    token counts and the run's history reaches back a full doubling (min_i t_i <= t_max / 2); otherwise the slope is
    NaN and the run is not plateaued. ``plateaued = slope < PLATEAU_SLOPE`` (0.005 EV per doubling).
    :func:`plateau_checkpoints` gives token counts spaced ``per_doubling`` per doubling (2 by default, so the last
    doubling holds 3 checkpoints).

Stop rule (:func:`stop_decision`)
    A general or scratch SAE trains until it plateaus or has seen one pass over its corpus's training split,
    whichever comes first: at a checkpoint, ``reason = "plateau"`` if plateaued, else ``"one_pass"`` if
    tokens >= split tokens, else no stop. When both hold at the same checkpoint the reason is ``"plateau"`` and
    ``one_pass`` is also True.

Seed-to-seed overlap (:func:`seed_overlap`)
    For every pair of seeds (i < j) of one condition, the fraction of latents matched one-to-one at decoder cosine
    >= 0.7 by the exact Hungarian matching (:func:`.overlap.hungarian_match`, :func:`.overlap.matched_fraction`;
    denominator: the smaller dictionary). Converged SAEs of one model and dataset match 30-53%
    (``CONVERGED_SEED_OVERLAP``, Paulo & Belrose 2025, "Sparse Autoencoders Trained on the Same Data Learn
    Different Features"); far fewer means the SAEs are still far from trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from .errors import AnalysisError
from .overlap import hungarian_match, matched_fraction

__all__ = ["PLATEAU_SLOPE", "Plateau", "plateau_slope", "plateau_checkpoints", "StopDecision", "stop_decision",
           "CONVERGED_SEED_OVERLAP", "OVERLAP_THRESHOLD", "SeedOverlap", "seed_overlap"]

PLATEAU_SLOPE = 0.005                 # EV per doubling of tokens below which a run has plateaued
CONVERGED_SEED_OVERLAP = (0.30, 0.53)  # Paulo & Belrose 2025: seed-to-seed matched fraction of converged SAEs
OVERLAP_THRESHOLD = 0.7               # decoder cosine of a one-to-one match that counts as "the same latent"


@dataclass(frozen=True)
class Plateau:
    """The plateau fit of one run: ``slope`` (EV per doubling over the last doubling; NaN when undefined),
    ``window`` (first and last token count of the last doubling), ``n_points`` in it, ``plateaued`` and ``why``."""

    slope: float
    window: tuple[float, float]
    n_points: int
    plateaued: bool
    threshold: float
    why: str

    def to_dict(self) -> dict:
        return {"slope_per_doubling": self.slope, "window": list(self.window), "n_points": self.n_points,
                "plateaued": self.plateaued, "threshold": self.threshold, "why": self.why}


def plateau_slope(tokens: Sequence[float], ev: Sequence[float], *, threshold: float = PLATEAU_SLOPE) -> Plateau:
    """Least-squares slope of held-out EV per doubling of tokens over the last doubling (module docstring)."""
    t = np.asarray(tokens, dtype=np.float64).reshape(-1)
    y = np.asarray(ev, dtype=np.float64).reshape(-1)
    if t.shape != y.shape or t.size == 0:
        raise AnalysisError(f"plateau_slope needs one EV per checkpoint (got {t.size} token counts, {y.size} EVs)")
    if not (np.all(np.isfinite(t)) and np.all(t > 0) and np.all(np.isfinite(y))):
        raise AnalysisError("plateau_slope needs positive token counts and finite EVs at every checkpoint")
    t_max = float(t.max())
    w = t >= t_max / 2
    x = np.log2(t[w])
    window = (float(t[w].min()), t_max)
    if float(t.min()) > t_max / 2 or np.unique(x).size < 2:
        why = (f"the checkpoints cover less than one doubling (first at {float(t.min()):,.0f} tokens, last at "
               f"{t_max:,.0f}): no slope yet")
        return Plateau(math.nan, window, int(w.sum()), False, threshold, why)
    xc = x - x.mean()
    slope = float((xc * (y[w] - y[w].mean())).sum() / (xc ** 2).sum())
    ok = slope < threshold
    why = (f"EV {'gains' if slope >= 0 else 'changes by'} {slope:+.4f} per doubling over {window[0]:,.0f}-"
           f"{t_max:,.0f} tokens ({int(w.sum())} checkpoints): {'<' if ok else '>='} {threshold}")
    return Plateau(slope, window, int(w.sum()), ok, threshold, why)


def plateau_checkpoints(first: int, limit: int, per_doubling: int = 2) -> list[int]:
    """Token counts ``b_j * 2^m`` up to ``limit``, with ``b_j = round(first * 2^(j / per_doubling))`` for
    j < per_doubling (so a checkpoint's half is again a checkpoint, exactly), then ``limit`` itself: where to
    measure held-out EV so that every doubling [t / 2, t] holds ``per_doubling + 1`` checkpoints."""
    first, limit = int(first), int(limit)
    if not (0 < first <= limit) or per_doubling < 1:
        raise AnalysisError(f"plateau_checkpoints needs 0 < first <= limit and per_doubling >= 1 (got {first}, "
                            f"{limit}, {per_doubling})")
    out = {limit}
    for j in range(per_doubling):
        t = int(round(first * 2 ** (j / per_doubling)))
        while t <= limit:
            out.add(t)
            t *= 2
    return sorted(out)


@dataclass(frozen=True)
class StopDecision:
    """Whether a training run stops at this checkpoint and why: ``reason`` is ``"plateau"``, ``"one_pass"`` or
    None (keep training); ``one_pass`` says whether the run has seen its whole training split."""

    stop: bool
    reason: Optional[str]
    tokens: float
    one_pass: bool
    plateau: Plateau

    def format(self) -> str:
        if not self.stop:
            return f"continue ({self.plateau.why})"
        if self.reason == "plateau":
            return f"stopped at {self.tokens:,.0f} tokens: plateau ({self.plateau.why})"
        return f"stopped at {self.tokens:,.0f} tokens: one pass over the training split ({self.plateau.why})"

    def to_dict(self) -> dict:
        return {"stop": self.stop, "reason": self.reason, "tokens": self.tokens, "one_pass": self.one_pass,
                "plateau": self.plateau.to_dict(), "text": self.format()}


def stop_decision(tokens: Sequence[float], ev: Sequence[float], split_tokens: float, *,
                  threshold: float = PLATEAU_SLOPE) -> StopDecision:
    """Stop at the latest checkpoint of ``(tokens, ev)`` when the run has plateaued or seen ``split_tokens`` (one
    pass over its corpus's training split), whichever comes first (module docstring)."""
    if not split_tokens > 0:
        raise AnalysisError(f"split_tokens must be positive (got {split_tokens})")
    fit = plateau_slope(tokens, ev, threshold=threshold)
    seen = float(np.max(np.asarray(tokens, dtype=np.float64)))
    one_pass = seen >= split_tokens
    reason = "plateau" if fit.plateaued else "one_pass" if one_pass else None
    return StopDecision(reason is not None, reason, seen, one_pass, fit)


@dataclass(frozen=True)
class SeedOverlap:
    """Pairwise one-to-one matched fractions between the seeds of one condition: ``pairs`` [(i, j, fraction)],
    their ``mean``/``min``/``max``, and the reference range of converged SAEs."""

    pairs: tuple[tuple[int, int, float], ...]
    threshold: float
    reference: tuple[float, float] = CONVERGED_SEED_OVERLAP

    @property
    def fractions(self) -> np.ndarray:
        return np.array([p[2] for p in self.pairs], dtype=np.float64)

    @property
    def mean(self) -> float:
        return float(self.fractions.mean())

    def format(self) -> str:
        f = self.fractions
        lo, hi = self.reference
        spread = f" (pairs: {100 * f.min():.0f}-{100 * f.max():.0f}%)" if f.size > 1 else ""
        return (f"{100 * self.mean:.0f}% of latents matched one-to-one at cosine >= {self.threshold:g} between "
                f"seeds{spread}; converged SAEs: {100 * lo:.0f}-{100 * hi:.0f}% (Paulo & Belrose 2025)")

    def to_dict(self) -> dict:
        f = self.fractions
        return {"pairs": [list(p) for p in self.pairs], "mean": self.mean, "min": float(f.min()),
                "max": float(f.max()), "threshold": self.threshold, "reference": list(self.reference),
                "text": self.format()}


def seed_overlap(saes: Sequence[Any], threshold: float = OVERLAP_THRESHOLD) -> SeedOverlap:
    """Matched fraction (Hungarian matching, cosine >= ``threshold``) of every pair of ``saes`` (the seeds of one
    condition: SAEs with ``W_dec`` or [d_sae, d_in] decoder matrices). Cost: one O(d_sae^3) assignment per pair
    (seconds at a few thousand latents)."""
    if len(saes) < 2:
        raise AnalysisError(f"seed_overlap compares seeds and needs at least 2 SAEs (got {len(saes)})")
    pairs = []
    for i in range(len(saes)):
        for j in range(i + 1, len(saes)):
            pairs.append((i, j, matched_fraction(hungarian_match(saes[i], saes[j]).cosines, threshold)))
    return SeedOverlap(tuple(pairs), float(threshold))
