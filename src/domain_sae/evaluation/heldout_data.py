"""The held-out data an evaluation or a feature store runs on: a live sample drawn with the model's tokenizer, or
held-out activation caches (`dsae cache --split heldout`).

:class:`HeldoutData` names the data (dataset specs, or cache directories); :meth:`HeldoutData.sets` turns it into
one :class:`HeldoutSet` per dataset once the held-out options are resolved (:meth:`.sae_set.SAESet.heldout_config`):

- live: ``data.token_stream.heldout_batch(replace(cfg, data=spec), tokenizer, n_tokens)`` (windows from many
  documents of the split held out for every SAE), unless ``given`` maps the spec to a ready
  :class:`~domain_sae.data.sampling.HeldoutSample` or an ``(input_ids, segments)`` pair (then each sequence is its
  own document);
- cached: each cache opened (its checksums read) once per hook, and refused when it holds another held-out sample
  than ``cfg`` would draw (:func:`domain_sae.activations.heldout_cache.heldout_data_mismatch`: another holdout
  fraction, context size, seed, model ... could be some SAE's training documents). A set then carries the cache's
  sample (its sequences, segments and document ids) and its activations at every hook.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..activations.heldout_cache import HeldoutCache, heldout_data_mismatch, open_heldout_cache
from ..data.sampling import HeldoutSample
from ..data.token_stream import heldout_batch
from .heldout import EvalError
from .positions import token_counts
from .sae_set import unique_labels

__all__ = ["HeldoutData", "HeldoutSet", "DEFAULT_DATASETS"]

DEFAULT_DATASETS = ("chat", "code")


@dataclass
class HeldoutSet:
    """One dataset's held-out tokens: ``input_ids`` [N, T] int64, ``segments`` [N, T] int8, ``doc_ids`` [N, T] (None:
    each sequence is its own document), ``sampling`` (the sample's summary, or None) and, from a cache,
    ``caches``: {hook: the cache opened at that hook} (empty for a live sample)."""

    label: str
    spec: str
    input_ids: Tensor
    segments: Tensor
    doc_ids: Optional[Tensor] = None
    sampling: Optional[dict] = None
    caches: dict[str, HeldoutCache] = field(default_factory=dict)

    @property
    def cache_path(self) -> Optional[Path]:
        """The cache directory of a cached set (None for a live sample)."""
        return next(iter(self.caches.values())).path if self.caches else None

    @property
    def model(self) -> Optional[str]:
        """The model a cached set's activations come from (None for a live sample: the evaluation's own model)."""
        return next(iter(self.caches.values())).model if self.caches else None

    def width(self, hook: str) -> int:
        """The activation width of a cached set at ``hook``."""
        return self.caches[hook].d_in

    def activations(self, hook: str, batch_size: int) -> Iterator[tuple[int, Tensor]]:
        """``(first sequence, activations [b, T, d] float32)`` of a cached set at ``hook`` (NaN where the cache holds
        none)."""
        return self.caches[hook].batches(batch_size)

    def record(self) -> dict:
        """The dataset's entry of eval.json's ``datasets``."""
        out: dict[str, Any] = {"spec": self.spec}
        if self.caches:
            first = next(iter(self.caches.values()))
            out.update({"activation_cache": str(first.path), "tokens_requested": first.manifest["tokens_requested"]})
        out.update({"tokens": token_counts(self.segments.to(torch.int64)), "sampling": self.sampling})
        return out


@dataclass(frozen=True)
class HeldoutData:
    """Dataset ``specs`` to draw live, or held-out activation ``caches`` (one dataset each); ``given``: ready
    samples by spec (a HeldoutSample or ``(input_ids, segments)``); ``verify``: check the caches' sha256."""

    specs: tuple[str, ...] = ()
    caches: tuple[str, ...] = ()
    given: Optional[Mapping[str, Any]] = None
    verify: bool = True

    def __post_init__(self):
        if self.specs and self.caches:
            raise EvalError("--data and --activations both choose the data; give one of them (a held-out cache is "
                            "one dataset).")
        if not self.specs and not self.caches:
            raise EvalError("No dataset given; pass --data chat, --data code or a file, or --activations CACHE "
                            "(built with dsae cache --split heldout).")

    @classmethod
    def live(cls, specs: Sequence[str], given: Optional[Mapping[str, Any]] = None) -> "HeldoutData":
        return cls(specs=tuple(str(s) for s in specs), given=given)

    @classmethod
    def cached(cls, paths: Sequence[str | Path], *, verify: bool = True) -> "HeldoutData":
        return cls(caches=tuple(str(p) for p in paths), verify=verify)

    @classmethod
    def choose(cls, specs: Optional[Sequence[str]], caches: Optional[Sequence[str | Path]]) -> "HeldoutData":
        """What a command's ``--data`` / ``--activations`` say (both given: refused; neither: chat and code)."""
        if caches and not specs:
            return cls.cached(caches)
        return cls(specs=tuple(str(s) for s in (specs or DEFAULT_DATASETS)), caches=tuple(str(p) for p in caches or ()))

    @property
    def from_cache(self) -> bool:
        return bool(self.caches)

    @property
    def labels(self) -> list[str]:
        names = list(self.caches or self.specs)
        return unique_labels(names) if len(set(names)) == len(names) else [f"{d}#{i}" for i, d in enumerate(names)]

    def sets(self, cfg: Any, *, tokenizer: Any = None, n_tokens: Optional[int] = None,
             hooks: Iterable[str] = (), model: Optional[str] = None) -> list[HeldoutSet]:
        """One :class:`HeldoutSet` per dataset for the resolved config ``cfg`` (module docstring): live, drawn with
        ``tokenizer`` (``n_tokens`` per dataset, default ``cfg.eval_tokens``); cached, opened at ``hooks`` (and
        refused when not of ``model``, the model that will read them, when given)."""
        if self.caches:
            return [self._open(path, label, cfg, list(dict.fromkeys(hooks)), model)
                    for path, label in zip(self.caches, self.labels)]
        n = int(n_tokens if n_tokens is not None else cfg.eval_tokens)
        return [self._draw(spec, label, cfg, tokenizer, n) for spec, label in zip(self.specs, self.labels)]

    def _draw(self, spec: str, label: str, cfg: Any, tokenizer: Any, n_tokens: int) -> HeldoutSet:
        sample = None if self.given is None else self.given.get(spec)
        if sample is None:
            sample = heldout_batch(dataclasses.replace(cfg, data=spec), tokenizer, n_tokens)
        ids, segs = (torch.as_tensor(t).cpu() for t in sample)
        if ids.ndim != 2 or ids.numel() == 0:
            raise EvalError(f"The held-out split of dataset '{spec}' is empty; raise holdout_fraction or use a "
                            f"larger dataset.")
        full = isinstance(sample, HeldoutSample)  # else a bare (ids, segs) pair: each sequence its own document
        return HeldoutSet(label, spec, ids.to(torch.int64), segs.to(torch.int8),
                          doc_ids=sample.doc_ids if full else None, sampling=sample.summary() if full else None)

    def _open(self, path: str, label: str, cfg: Any, hooks: list[str], model: Optional[str]) -> HeldoutSet:
        opened = {h: open_heldout_cache(path, h, verify=self.verify) for h in hooks}
        first = next(iter(opened.values()))
        problems = heldout_data_mismatch(first, cfg, model=model)
        if problems:
            raise EvalError(f"The cache {first.path} holds another held-out sample than the SAEs' evaluation draws: "
                            f"{'; '.join(problems)}. Build the cache with those options (dsae cache --split heldout "
                            f"...), or pass them to the command.")
        return HeldoutSet(label, first.data, first.input_ids, first.segments, doc_ids=first.doc_ids,
                          sampling=first.manifest.get("sampling"), caches=opened)
