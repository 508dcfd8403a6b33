"""The SAEs of one evaluation or feature store: loaded once, labelled once, checked once.

:class:`SAESet` is what ``dsae eval`` (live or ``--activations``) and ``dsae features`` take:

- **labels** (:func:`sae_labels`, the one rule): a run directory's SAE ``RUN/sae`` is named after its run, ``RUN``;
  then the shortest trailing path parts that tell the SAEs apart (``x/general``, ``y/general``), and ``#2``,
  ``#3`` ... for a path given twice;
- **hooks**: each SAE's metadata ``hook_name`` (``blocks.0.hook_mlp_out`` when it names none), or the one hook given
  (:meth:`SAESet.at_hook`; the check then refuses SAEs trained at another hook);
- **training mask**: an SAE's metadata ``exclude_special_tokens`` (the caller's default when absent); the SAEs are
  grouped by (hook, training mask) so a group shares its clean pass and ablations (:meth:`SAESet.groups`);
- **held-out options** from the metadata (model, context size, BOS, holdout fraction:
  :func:`.heldout.resolve_eval_config`, via :meth:`SAESet.heldout_config`);
- **the compatibility check** (:meth:`SAESet.check`, the only one of the three commands): every SAE's d_in equals
  the width at its hook, and the model and hook its metadata names are the ones used
  (:func:`domain_sae.sae.base.check_compatible`, the rule training uses too). A misfit is refused with one
  paragraph, :class:`EvalCompatibilityError`, before any SAE is run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from ..config import DataConfig
from ..sae.base import check_compatible
from ..sae.io import load_sae
from ..sae.model_config import SAECompatibilityError
from .heldout import EvalError, resolve_eval_config, sae_metadata
from .patching import sae_widths

__all__ = ["SAESet", "SAEEntry", "EvalCompatibilityError", "sae_labels", "unique_labels", "DEFAULT_HOOK"]

DEFAULT_HOOK = DataConfig.hook  # for an SAE whose metadata names no hook when no hook is given


class EvalCompatibilityError(EvalError, SAECompatibilityError):
    """An SAE that does not fit the model, hook or activation cache it is evaluated on (d_in, model or hook)."""


def unique_labels(paths: Sequence[str]) -> list[str]:
    """Shortest trailing path parts that tell the paths apart (``runA/x``, ``runB/x``); ``#2``, ``#3`` ... for
    repeats."""
    parts = [Path(p).resolve().parts if Path(p).exists() else Path(p).parts for p in paths]
    return _shortest([p if p else (str(paths[i]),) for i, p in enumerate(parts)])


def sae_labels(paths: Sequence[str]) -> list[str]:
    """The one labelling rule of SAEs (module docstring): ``runs/a/sae`` -> ``a``."""
    parts = [Path(p).resolve().parts if Path(p).exists() else Path(p).parts for p in paths]
    parts = [p[:-1] if len(p) > 1 and p[-1] == "sae" else p for p in parts]
    return _shortest([p if p else (str(paths[i]),) for i, p in enumerate(parts)])


def _shortest(parts: list[tuple[str, ...]]) -> list[str]:
    """The fewest trailing parts that tell apart every two different paths (the same path twice: ``#2``)."""
    distinct = len(set(parts))
    depth = 1
    while True:
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == distinct or depth >= max(len(p) for p in parts):
            break
        depth += 1
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab if seen[lab] == 1 else f"{lab}#{seen[lab]}")
    return out


@dataclass(frozen=True)
class SAEEntry:
    """One SAE of a set: its ``label``, the ``path`` it was given as, the module, the ``hook`` it runs at and its
    training ``metadata`` (``sae.cfg.metadata``)."""

    label: str
    path: str
    sae: Any
    hook: str
    metadata: dict

    @property
    def d_in(self) -> int:
        return sae_widths(self.sae)[0]

    @property
    def d_sae(self) -> int:
        return sae_widths(self.sae)[1]

    def exclude_special(self, default: bool = True) -> bool:
        """The SAE's training mask: whether it was trained without special-token positions."""
        return bool(self.metadata.get("exclude_special_tokens", default))

    def describe(self, splice: str) -> dict:
        """The SAE's entry of eval.json's ``saes``."""
        return {"path": self.path, "hook": self.hook, "d_in": self.d_in, "d_sae": self.d_sae,
                "architecture": self.sae.cfg.architecture, "trained_on": self.metadata.get("dataset_path"),
                "model_name": self.metadata.get("model_name"), "splice": splice, "metadata": self.metadata}


@dataclass(frozen=True)
class SAESet:
    """SAEs in the order given, each labelled, placed at a hook and carrying its metadata (module docstring).
    ``hook``: the hook every SAE was placed at by :meth:`at_hook`, or None (each at its own)."""

    entries: tuple[SAEEntry, ...]
    hook: Optional[str] = None

    @classmethod
    def load(cls, sources: Sequence[str | Path], *, hook: Optional[str] = None) -> "SAESet":
        """Load every source with :func:`domain_sae.sae.io.load_sae` (our directories, run directories, SAELens
        directories or releases, ``hf://`` paths)."""
        return cls.of([load_sae(s) for s in sources], [str(s) for s in sources], hook=hook)

    @classmethod
    def of(cls, saes: Sequence[Any], paths: Optional[Sequence[str | Path]] = None, *,
           hook: Optional[str] = None) -> "SAESet":
        """A set of SAEs already loaded; ``paths`` (or names) label them by the one rule (``sae_0``, ... when
        absent)."""
        saes = list(saes)
        if not saes:
            raise EvalError("No SAE given; pass one or more SAE directories.")
        paths = [str(p) for p in paths] if paths is not None else [f"sae_{i}" for i in range(len(saes))]
        if len(paths) != len(saes):
            raise EvalError(f"{len(saes)} SAEs given for {len(paths)} paths.")
        entries = []
        for label, path, sae in zip(sae_labels(paths), paths, saes):
            meta = sae_metadata(sae)
            entries.append(SAEEntry(label, path, sae, hook or meta.get("hook_name") or DEFAULT_HOOK, meta))
        return cls(tuple(entries), hook)

    def at_hook(self, hook: Optional[str]) -> "SAESet":
        """The same SAEs all placed at ``hook`` (unchanged for None); :meth:`check` refuses those trained at
        another hook."""
        if not hook:
            return self
        return SAESet(tuple(replace(e, hook=hook) for e in self.entries), hook)

    def __iter__(self) -> Iterator[SAEEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def labels(self) -> list[str]:
        return [e.label for e in self.entries]

    @property
    def hooks(self) -> list[str]:
        """The distinct hooks, sorted."""
        return sorted({e.hook for e in self.entries})

    def heldout_config(self, cfg: Any, *, model_name: Optional[str] = None) -> tuple[Any, dict]:
        """(``cfg`` with its null held-out options filled from the metadata, the record of where each came from):
        :func:`.heldout.resolve_eval_config`; ``model_name``: the model already loaded, if any."""
        return resolve_eval_config(cfg, [e.sae for e in self.entries], self.labels, model_name=model_name)

    def check(self, *, model: Optional[str], width: Callable[[str], int], allow_model_mismatch: bool = False
              ) -> None:
        """Refuse the first SAE that does not fit: its d_in differs from ``width(hook)`` (the model's or the
        activation cache's width at its hook), its metadata names another model than ``model`` (unless
        ``allow_model_mismatch``) or another hook than the one it is placed at."""
        for e in self.entries:
            try:
                check_compatible(e.sae, d_in=width(e.hook), model_name=None if allow_model_mismatch else model,
                                 hook_name=e.hook)
            except SAECompatibilityError as err:
                raise EvalCompatibilityError(f"SAE {e.label} ({e.path}) does not fit: {err} Or leave this SAE "
                                             f"out.") from None

    def to(self, device: Any) -> "SAESet":
        for e in self.entries:
            e.sae.to(device)
        return self

    def groups(self, default_exclude_special: bool = True) -> dict[tuple[str, bool], dict[str, Any]]:
        """{(hook, training mask): {label: SAE}}, sorted by key: the SAEs that can share one clean pass."""
        out: dict[tuple[str, bool], dict[str, Any]] = {}
        for e in self.entries:
            out.setdefault((e.hook, e.exclude_special(default_exclude_special)), {})[e.label] = e.sae
        return dict(sorted(out.items()))

    def at(self, hook: str) -> dict[str, Any]:
        """{label: SAE} of the SAEs placed at ``hook``."""
        return {e.label: e.sae for e in self.entries if e.hook == hook}
