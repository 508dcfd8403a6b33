"""Per-document sufficient statistics of SAEs on a held-out set, the metrics computed from them (point values and
bootstrap replicates), and blends of runs at a matched L0: the inputs of the paired comparisons (:mod:`.paired`).

Per-document sufficient statistics (:class:`DocStats`)
    Every metric is a function m(T) of totals T = Σ_d S_d of per-document sums S_d (:mod:`..evaluation.uncertainty`).
    One SAE on one held-out set is ``doc_ids`` [D] (its held-out document ids, sorted) and ``sums``: key -> float64
    [D] or [D, k], keyed by the evaluation's :class:`..evaluation.uncertainty.SumKey` in two groups:

        SumKey("lm", "n")                       counted next-token positions of the document
        SumKey("lm", "ce", c), c in CLEAN, SAE, ZERO (and MEAN)   Σ CE in nats: clean model, this SAE spliced in,
                                                 zero ablation (mean ablation)
        SumKey("lm", "kl", c), c in SAE, ZERO (and MEAN)           Σ KL(p_clean || p_patched)
        SumKey("rec", k)                         the sums of :func:`..evaluation.uncertainty.reconstruction_token_stats`
                                                 (n, e = Σ||x - x̂||², v = Σ||x - c||², dx = Σ(x - c) [d_in], ...)

    (SAE = ``Condition("sae")``: whichever SAE it is, so two DocStats line up key by key.) Every metric comes from
    the evaluation's own formulas (:func:`..evaluation.lm_metrics.lm_from_totals`,
    :func:`..evaluation.uncertainty.reconstruction_from_totals`), e.g. CE-loss score = (Σ ce_zero - Σ ce_sae) /
    (Σ ce_zero - Σ ce_clean) and EV = 1 - Σ e / (Σ v - ||Σ dx||² / Σ n). Ratio metrics are recomputed from the
    resampled sums, never averaged over documents. :meth:`DocStats.from_evaluation` takes the evaluation's
    per-document sums (``DocumentSums.sums``) of one SAE, :meth:`DocStats.from_result` those an
    ``SAEResult`` carries (``documents``); :meth:`DocStats.save` / :meth:`DocStats.load` keep them
    in one ``.npz`` beside a run's evaluation (a study is resumable). Replicates of a named metric are cached per
    DocStats and (metric, R, seed), since a study compares one SAE with many.

Matched L0 (:func:`at_l0`)
    A condition's value at L0 t interpolates two runs of its sparsity ladder linearly in log L0 (the weights of
    :class:`.stats.Frontier`): m(t) = Σ_i c_i m(T_i). A :class:`Blend` holds the (c_i, run) and every replicate
    applies the c_i to that replicate's metrics of the runs, so the interval is that of the interpolated value.

Pairing (:func:`check_pairing`)
    SAEs compared in one bootstrap must share their document ids and count the same tokens per document (equal
    ``n`` sums); otherwise :class:`.errors.AnalysisError` names what differs.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ..evaluation.lm_metrics import CLEAN, MEAN, ZERO, Condition, lm_from_totals
from ..evaluation.positions import OVERALL
from ..evaluation.uncertainty import SumKey, reconstruction_from_totals
from ..util.atomic import atomic_write_bytes
from .errors import AnalysisError
from .stats import Frontier

__all__ = ["DocStats", "Blend", "Side", "at_l0", "LM_METRICS", "SAE", "LM", "REC", "Metric", "metric_function",
           "side_values", "seeds_of", "check_pairing"]

SAE = Condition("sae")  # the condition of the SAE a DocStats describes, whatever its label
LM, REC = "lm", "rec"   # the two groups of a DocStats' keys
_LM_KEYS = (SumKey(LM, "n"),) + tuple(SumKey(LM, st, c) for st in ("ce", "kl") for c in (CLEAN, SAE, ZERO, MEAN))
LM_METRICS = tuple(lm_from_totals({k: torch.ones(()) for k in _LM_KEYS}, LM, SAE, True))  # from the lm sums
_CHUNK = 2048  # replicates per tensordot (bounds the [chunk, d_in] totals of rec dx)
Metric = Union[str, Callable[[Mapping[SumKey, Tensor]], Tensor]]


@dataclass(frozen=True, eq=False)
class DocStats:
    """Per-document sums of one SAE on one held-out set (module docstring): ``doc_ids`` [D] int64, ``sums``
    :class:`SumKey` -> float64 [D] or [D, k]."""

    doc_ids: np.ndarray
    sums: Mapping[SumKey, Tensor]
    replicates: dict = field(default_factory=dict, compare=False, repr=False)  # cache: (metric, R, seed) -> [R]

    def __post_init__(self):
        ids = np.asarray(self.doc_ids, dtype=np.int64).reshape(-1)
        object.__setattr__(self, "doc_ids", ids)
        object.__setattr__(self, "sums", {k: torch.as_tensor(v, dtype=torch.float64) for k, v in self.sums.items()})
        if ids.size == 0 or np.any(np.diff(ids) <= 0):
            raise AnalysisError(f"DocStats needs sorted, distinct document ids (got {ids.size} ids)")
        for k, v in self.sums.items():
            if v.ndim == 0 or v.shape[0] != ids.size:
                raise AnalysisError(f"per-document sum {k} has shape {tuple(v.shape)}; expected [{ids.size}, ...], "
                                    f"one row per document id")

    @property
    def n_docs(self) -> int:
        return int(self.doc_ids.size)

    @classmethod
    def from_evaluation(cls, lm_sums: Optional[Mapping[SumKey, Tensor]], rec_sums: Optional[Mapping[SumKey, Tensor]],
                        *, doc_ids, sae: Condition, group: str = "overall") -> "DocStats":
        """One SAE's :class:`DocStats` from the evaluation's per-document sums (``DocumentSums.sums``) of ``group``:
        ``lm_sums`` (the pass's CE/KL sums; ``sae`` = this SAE's ``Condition("sae", label)``; other SAEs' sums are
        left out) and ``rec_sums`` (this SAE's reconstruction sums). Rows past ``len(doc_ids)`` (the evaluation's
        extra cluster of inserted BOS / padding) must be zero and are dropped."""
        ids = np.asarray(doc_ids, dtype=np.int64).reshape(-1)
        out: dict[SumKey, Tensor] = {}
        for k, v in (lm_sums or {}).items():
            if k.group != group:
                continue
            if k.condition in (None, CLEAN, ZERO, MEAN):
                out[SumKey(LM, k.stat, k.condition)] = v
            elif k.condition == sae:
                out[SumKey(LM, k.stat, SAE)] = v
        if lm_sums and SumKey(LM, "ce", SAE) not in out:
            present = sorted({str(k.condition) for k in lm_sums if k.stat == "ce"})
            raise AnalysisError(f"no per-document CE of {sae} in group {group!r}; conditions present: {present}")
        out.update({SumKey(REC, k.stat): v for k, v in (rec_sums or {}).items() if k.group == group})
        trimmed = {}
        for k, v in out.items():
            v = torch.as_tensor(v, dtype=torch.float64)
            if v.shape[0] < ids.size or bool(v[ids.size:].abs().sum() > 0):
                raise AnalysisError(f"per-document sum {k} has {v.shape[0]} rows with counts past the {ids.size} "
                                    f"documents; pass the doc_ids the evaluation clustered on")
            trimmed[k] = v[:ids.size]
        return cls(ids, trimmed)

    @classmethod
    def from_result(cls, result) -> "DocStats":
        """:meth:`from_evaluation` of an :class:`..evaluation.lm_metrics.SAEResult`'s ``documents`` (its per-document
        sums of the headline group)."""
        doc = result.documents
        if not doc:
            raise AnalysisError("this evaluation result carries no per-document sums (results of "
                                "evaluate_saes_on_tokens do); evaluate the SAE on the held-out tokens again")
        return cls.from_evaluation(doc["lm"], doc["rec"], doc_ids=doc["doc_ids"], sae=doc["sae"], group=OVERALL)

    def save(self, path: str | Path) -> None:
        """Write to one ``.npz`` file (atomically): ``doc_ids``, the keys as JSON and one array per key."""
        keys = sorted(self.sums, key=str)
        names = [[k.group, k.stat, None if k.condition is None else list(k.condition)] for k in keys]
        buf = io.BytesIO()
        np.savez(buf, doc_ids=self.doc_ids, keys=np.array(json.dumps(names)),
                 **{f"s{i}": self.sums[k].numpy() for i, k in enumerate(keys)})
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> "DocStats":
        with np.load(path) as z:
            names = json.loads(str(z["keys"]))
            keys = [SumKey(g, st, None if c is None else Condition(*c)) for g, st, c in names]
            return cls(z["doc_ids"], {k: torch.from_numpy(z[f"s{i}"]) for i, k in enumerate(keys)})


@dataclass(frozen=True)
class Blend:
    """A metric value interpolated between runs: m = Σ_i weight_i m(run_i) (the runs share their documents)."""

    parts: tuple[tuple[float, DocStats], ...]

    @property
    def doc_ids(self) -> np.ndarray:
        return self.parts[0][1].doc_ids


Side = Union[DocStats, Blend]


def at_l0(runs: Sequence[tuple[float, DocStats]], target: float, name: str = "") -> Blend:
    """The :class:`Blend` of ``runs`` ((L0, DocStats) of one seed's sparsity ladder) at L0 ``target``: the log-L0
    interpolation weights of :class:`.stats.Frontier` (runs at one L0 averaged; :class:`.stats.ExtrapolationError`
    outside the ladder's L0 range)."""
    l0s = [float(r[0]) for r in runs]
    parts = []
    for j, (_, stats) in enumerate(runs):
        unit = [1.0 if i == j else 0.0 for i in range(len(runs))]
        c = Frontier.from_points(l0s, unit, name=name).at(target)[0]  # the frontier is linear in its values
        if c != 0.0:
            parts.append((float(c), stats))
    return Blend(tuple(parts))


def _components(side: Side) -> tuple[tuple[float, DocStats], ...]:
    return side.parts if isinstance(side, Blend) else ((1.0, side),)


def metric_function(metric: Metric) -> tuple[Callable[[Mapping[SumKey, Tensor]], Tensor], Optional[str]]:
    """(function of the totals, the key group it needs: LM, REC or None for all) of a metric name or callable."""
    if callable(metric):
        return metric, None
    if metric in LM_METRICS:
        return (lambda t: lm_from_totals(t, LM, SAE, SumKey(LM, "ce", MEAN) in t)[metric]), LM
    return (lambda t: reconstruction_from_totals(t, REC)[metric]), REC


def _values(stats: DocStats, fn, group: Optional[str], weights: Optional[Tensor], key=None) -> Tensor:
    """m(T) of one SAE: 0-dim for ``weights=None`` (the plain totals), else [R] (one value per replicate), kept
    in ``stats.replicates[key]`` when a ``key`` names the weights (a study compares one SAE with many)."""
    if key is not None and weights is not None and key in stats.replicates:
        return stats.replicates[key]
    out = _compute(stats, fn, group, weights)
    if key is not None and weights is not None:
        stats.replicates[key] = out
    return out


def _compute(stats: DocStats, fn, group: Optional[str], weights: Optional[Tensor]) -> Tensor:
    sums = {k: v for k, v in stats.sums.items() if group is None or k.group == group}
    if not sums:
        raise AnalysisError(f"these per-document sums have no {group!r} statistics, which this metric needs (keys: "
                            f"{sorted(map(str, stats.sums))})")
    if weights is None:
        return fn({k: v.sum(0) for k, v in sums.items()}).to(torch.float64)
    out = [fn({k: torch.tensordot(weights[i:i + _CHUNK], v, dims=([1], [0])) for k, v in sums.items()})
           for i in range(0, weights.shape[0], _CHUNK)]
    return torch.cat(out).to(torch.float64)


def side_values(side: Side, fn, group: Optional[str], weights: Optional[Tensor], key=None) -> Tensor:
    """m of a DocStats, or Σ_i c_i m(run_i) of a Blend: 0-dim without ``weights``, else [R]; ``(fn, group)`` from
    :func:`metric_function`; ``key`` (hashable, naming metric and weights) caches the replicates."""
    return sum(c * _values(s, fn, group, weights, key) for c, s in _components(side))


def seeds_of(x: Union[Side, Sequence[Side]]) -> list[Side]:
    """One condition as a list of its seeds (a single DocStats or Blend is one seed)."""
    out = [x] if isinstance(x, (DocStats, Blend)) else list(x)
    if not out:
        raise AnalysisError("a condition needs at least one SAE (one DocStats or Blend per seed)")
    return out


def check_pairing(sides: Sequence[Side], group: Optional[str]) -> np.ndarray:
    """The document ids all ``sides`` share (module docstring: same ids, same token counts in ``group``'s ``n``,
    both groups when None)."""
    stats = [s for side in sides for _, s in _components(side)]
    ids = stats[0].doc_ids
    counts = [SumKey(g, "n") for g in ((group,) if group else (LM, REC))]
    for s in stats[1:]:
        if not np.array_equal(s.doc_ids, ids):
            raise AnalysisError(f"the SAEs were measured on different held-out documents ({ids.size} vs "
                                f"{s.doc_ids.size} ids, or other ids); a paired comparison needs the same held-out "
                                f"set: evaluate both on the same data, holdout fraction and sampling seed")
        for k in counts:
            if k in s.sums and k in stats[0].sums and not torch.equal(s.sums[k], stats[0].sums[k]):
                raise AnalysisError(f"the SAEs counted different tokens per document ({k.group}); a paired comparison "
                                    f"needs the same tokens and positions (same context size and splice mask)")
    return ids
