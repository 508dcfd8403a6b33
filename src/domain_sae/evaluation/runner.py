"""Evaluation of one SAE on one token set, and the trainer's evaluator (the SAE × dataset matrix of ``dsae eval`` is
:mod:`.matrix`).

- :func:`evaluate_sae` — every metric of :mod:`.lm_metrics` / :mod:`.metrics` for one SAE as a flat dict with the
  SPEC section 3 names (``metrics/ce_loss_score``, ...), the token counts (``tokens/...``) and a ``segments``
  sub-dict (segment name -> the same keys).
- :func:`make_evaluator` — ``evaluator(sae) -> dict[str, float]`` for the trainer, the same code on a fixed
  held-out batch, so training logs and ``dsae eval`` agree on the same tokens.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .lm_metrics import SAEResult, evaluate_saes_on_tokens

__all__ = ["evaluate_sae", "make_evaluator", "TRAINING_LOG_KEYS"]


# Keys the trainer also logs with a training-batch meaning (SPEC sections 1 and 3); the evaluator returns its
# held-out values of these under "heldout/<name>" so they do not overwrite the training-batch values.
TRAINING_LOG_KEYS = ("metrics/explained_variance", "metrics/explained_variance_std", "metrics/l0",
                     "metrics/mean_log10_feature_sparsity", "sparsity/")


# ----------------------------------------------------------------------------------------------------------------
# One SAE

def _flatten(res: SAEResult, per_segment: bool) -> dict:
    out: dict[str, Any] = dict(res.metrics)
    out.update({k: v for k, v in res.tokens.items() if k not in out})
    if per_segment:
        out["segments"] = res.segments
    if res.errors:
        out["errors"] = res.errors
    return out


def evaluate_sae(sae: Any, lm: Any, hook: Any, input_ids: Tensor, segments: Tensor, *, batch_size: int = 8,
                 mean_ablation: bool = False, per_segment: bool = True, doc_ids: Optional[Tensor] = None,
                 exclude_special: bool = True, splice_all_positions: bool = False, n_bootstrap: int = 0,
                 bootstrap_seed: int = 0) -> dict:
    """All metrics of ``sae`` spliced at ``hook`` (a HookPoint or its name) of ``lm`` (LoadedModel or module) on
    ``input_ids``/``segments`` [N, T]: a flat dict of SPEC section 3 keys (``metrics/...``, ``sparsity/...``),
    token counts (``tokens/...``), with ``per_segment`` ``segments``: {segment name: same keys}, and with
    ``n_bootstrap`` > 0 ``errors``: {group: {metric: {se, ci95_low, ci95_high}}} (bootstrap over ``doc_ids``).
    Splicing and counted positions: :mod:`.lm_metrics`."""
    res = evaluate_saes_on_tokens({"sae": sae}, lm, hook, input_ids, segments, batch_size=batch_size,
                                  mean_ablation=mean_ablation, per_segment=per_segment, doc_ids=doc_ids,
                                  exclude_special=exclude_special, splice_all_positions=splice_all_positions,
                                  n_bootstrap=n_bootstrap, bootstrap_seed=bootstrap_seed)["sae"]
    return _flatten(res, per_segment)



def make_evaluator(lm: Any, hook: Any, input_ids: Tensor, segments: Tensor, *, batch_size: int = 8,
                   mean_ablation: bool = False, exclude_special: bool = True,
                   splice_all_positions: bool = False) -> Callable[[Any], dict[str, float]]:
    """``evaluator(sae) -> dict[str, float]`` on this fixed held-out batch, for the trainer.

    Same computation as :func:`evaluate_sae` (and ``dsae eval``; the SAE spliced at its training mask
    ``exclude_special`` unless ``splice_all_positions``). The LM metrics keep their SPEC names
    (``metrics/ce_loss_score``, ``metrics/ce_loss_without_sae``, ...); the keys the trainer also logs with a
    training-batch meaning (:data:`TRAINING_LOG_KEYS`: explained variance, L0, ``sparsity/...``) are returned as
    ``heldout/<name without prefix>`` (e.g. ``heldout/explained_variance``, ``heldout/dead_features``).
    """
    ids = torch.as_tensor(input_ids).clone()
    segs = torch.as_tensor(segments).clone()

    def evaluator(sae: Any) -> dict[str, float]:
        flat = evaluate_sae(sae, lm, hook, ids, segs, batch_size=batch_size, mean_ablation=mean_ablation,
                            per_segment=False, exclude_special=exclude_special,
                            splice_all_positions=splice_all_positions)
        out: dict[str, float] = {}
        for k, v in flat.items():
            if any(k == p or (p.endswith("/") and k.startswith(p)) for p in TRAINING_LOG_KEYS):
                out["heldout/" + k.split("/", 1)[1]] = v
            else:
                out[k] = v
        return out

    return evaluator
