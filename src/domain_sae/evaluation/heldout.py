"""The held-out data an evaluation of several SAEs may use, from the SAEs' training metadata.

:func:`resolve_eval_config` turns an :class:`~domain_sae.config.EvalConfig` whose held-out options are null into a
concrete one; :meth:`.sae_set.SAESet.heldout_config` calls it for ``dsae eval`` (live or from a cache) and
``dsae features``, so a Python caller and the CLI evaluate on the same documents. For SAEs i = 1..n with metadata
values:

- ``model``: the first SAE's ``model_name`` (the compatibility check then refuses SAEs of another model);
- ``context_size``: the common ``context_size``; when they differ, the smallest (every SAE sees only positions it
  was trained at) with a warning naming each SAE's value; given explicitly, a warning for SAEs trained at less;
- ``prepend_bos``: the common value; SAEs that disagree are refused unless it is given;
- ``holdout_fraction``: a document is held out for SAE i iff u(doc) < f_i (:mod:`domain_sae.data.splits`), so the
  documents held out for every SAE are those with u(doc) < min_i f_i. The default is f = min_i f_i over the SAEs
  that record one; f = 0 (an SAE trained with nothing held out) is refused, and so is an explicit f > min_i f_i
  (those documents are some SAE's training data). SAEs without a recorded fraction (e.g. SAELens's) do not
  constrain it; with none recorded the data default (0.05) applies.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Sequence

from ..config import DEFAULT_MODEL, DataConfig, EvalConfig
from ..errors import UserError

__all__ = ["EvalError", "sae_metadata", "resolve_eval_config"]


class EvalError(UserError):
    """An evaluation that cannot run as asked (no SAEs, no datasets, unusable held-out data)."""


def sae_metadata(sae: Any) -> dict:
    """The SAE's training metadata (``sae.cfg.metadata``, a dict; empty when it records none)."""
    return dict(sae.cfg.metadata or {})


def _values(metas: dict[str, dict], key: str) -> dict[str, Any]:
    return {label: m[key] for label, m in metas.items() if m.get(key) is not None}


def _listing(values: dict[str, Any]) -> str:
    return ", ".join(f"{label}: {v}" for label, v in values.items())


def _context_size(cfg: EvalConfig, metas: dict[str, dict]) -> int:
    trained = {k: int(v) for k, v in _values(metas, "context_size").items()}
    if cfg.context_size is not None:
        shorter = {k: v for k, v in trained.items() if v < cfg.context_size}
        if shorter:
            warnings.warn(f"context_size {cfg.context_size} is longer than some SAEs were trained at "
                          f"({_listing(shorter)}); their positions beyond that are out of their training "
                          f"distribution.", stacklevel=3)
        return int(cfg.context_size)
    if not trained:
        return DataConfig.context_size
    if len(set(trained.values())) > 1:
        warnings.warn(f"The SAEs were trained at different context sizes ({_listing(trained)}); evaluating all at "
                      f"the smallest, {min(trained.values())}. Pass --context-size to choose another.",
                      stacklevel=3)
    return min(trained.values())


def _holdout_fraction(cfg: EvalConfig, metas: dict[str, dict]) -> float:
    fractions = {k: float(v) for k, v in _values(metas, "holdout_fraction").items()}
    if not fractions:
        return DataConfig.holdout_fraction if cfg.holdout_fraction is None else float(cfg.holdout_fraction)
    smallest = min(fractions.values())
    if smallest <= 0:
        zero = [k for k, v in fractions.items() if v <= 0]
        raise EvalError(f"No document is held out for every SAE: {', '.join(zero)} held out nothing "
                        f"(holdout_fraction 0), so any document may be in its training data. Evaluate the other "
                        f"SAEs without it, or retrain it with a held-out split (e.g. --holdout-fraction 0.05).")
    if cfg.holdout_fraction is None:
        return smallest
    if cfg.holdout_fraction > smallest:
        over = {k: v for k, v in fractions.items() if v < cfg.holdout_fraction}
        raise EvalError(f"holdout_fraction {cfg.holdout_fraction} includes training documents of {_listing(over)} "
                        f"(a document is held out for an SAE only when its hash is below that SAE's fraction). "
                        f"Use --holdout-fraction {smallest} or less, or leave it out to use {smallest}.")
    if cfg.holdout_fraction <= 0:
        raise EvalError("holdout_fraction must be positive to evaluate on held-out documents.")
    return float(cfg.holdout_fraction)


def resolve_eval_config(cfg: EvalConfig, saes: Sequence[Any], labels: Sequence[str], *,
                        model_name: str | None = None) -> tuple[EvalConfig, dict]:
    """(the concrete config, a record of where each held-out value came from) for evaluating ``saes`` (labelled
    ``labels``) together; rules in the module docstring. ``model_name``: the model actually used when one is passed
    in (it wins over the metadata)."""
    metas = {label: sae_metadata(sae) for label, sae in zip(labels, saes)}
    first_model = next(iter(_values(metas, "model_name").values()), None)
    model = cfg.model or model_name or first_model or DEFAULT_MODEL
    bos_values = _values(metas, "prepend_bos")
    if cfg.prepend_bos is not None:
        prepend_bos = bool(cfg.prepend_bos)
    elif len({bool(v) for v in bos_values.values()}) > 1:
        raise EvalError(f"The SAEs were trained with different prepend_bos ({_listing(bos_values)}); pass "
                        f"--prepend-bos true or false to evaluate them on the same tokens, or evaluate them apart.")
    else:
        prepend_bos = bool(next(iter(bos_values.values()), DataConfig.prepend_bos))
    resolved = dataclasses.replace(cfg, model=model, context_size=_context_size(cfg, metas),
                                   prepend_bos=prepend_bos, holdout_fraction=_holdout_fraction(cfg, metas))
    record = {"context_size": resolved.context_size, "prepend_bos": prepend_bos,
              "holdout_fraction": resolved.holdout_fraction,
              "trained": {label: {k: m.get(k) for k in ("context_size", "prepend_bos", "holdout_fraction")}
                          for label, m in metas.items()},
              "rule": "documents held out for every SAE: hash < min holdout_fraction"}
    return resolved, record
