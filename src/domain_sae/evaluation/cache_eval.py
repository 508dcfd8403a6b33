"""The reconstruction metrics of SAEs on a held-out activation cache, no model (`dsae eval --activations CACHE`).

The cache (`dsae cache --split heldout`, :mod:`domain_sae.activations.heldout_cache`) holds the evaluation's own
held-out sample (the windows ``data.token_stream.heldout_batch`` draws) and its activations at each hook, so the
reconstruction metrics computed here (explained variance, MSE, cosine, L0, dead / dense latents, per segment,
bootstrap error bars over documents) are those of `dsae eval` on the live model, from the same definitions
(:class:`.lm_metrics.ReconstructionSums`, :func:`.lm_metrics.group_means`), without running the model. The CE / KL
metrics need the model's later layers with the SAE spliced in, so they are not computed (eval.json records
``splice: "not_spliced"``); evaluate without ``--activations`` for them. The matrix over SAEs and caches, with its
checks, is :func:`.matrix.eval_matrix`.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .heldout_data import HeldoutSet
from .lm_metrics import Condition, ReconstructionSums, SAEResult, clusters, group_means, results_of
from .metrics import MetricError
from .positions import OVERALL, groups, has_template, reconstruction_positions, token_counts
from .uncertainty import DocumentSums

__all__ = ["evaluate_saes_on_cache", "NOT_SPLICED"]

NOT_SPLICED = "not_spliced"


@torch.no_grad()
def evaluate_saes_on_cache(saes: Mapping[str, Any], data: HeldoutSet, hook: str, *, batch_size: int = 32,
                           per_segment: bool = True, n_bootstrap: int = 0, bootstrap_seed: int = 0
                           ) -> dict[str, SAEResult]:
    """label -> :class:`SAEResult` (reconstruction metrics only) of every SAE in ``saes`` on the cached held-out set
    ``data`` at ``hook``."""
    if not saes:
        raise MetricError("No SAE to evaluate.")
    segs = data.segments.to(torch.int64)
    cluster, n_docs = clusters(data.doc_ids)
    device = next(iter(saes.values())).W_dec.device

    def batches():
        for i, a in data.activations(hook, batch_size):  # NaN where the cache holds nothing: never counted
            yield i, torch.nan_to_num(a, nan=0.0).to(device), segs[i:i + a.shape[0]]

    means = group_means((a, s) for _, a, s in batches())
    if OVERALL not in means:
        raise MetricError(f"The cache {data.caches[hook].path} holds no content token (text, user, assistant or "
                          f"system); build it from data with ordinary content.")
    recon = {label: ReconstructionSums(means, n_docs) for label in saes}
    with_all = per_segment and has_template(segs)
    for i, a, s in batches():
        rec_groups = groups(s, reconstruction_positions(s), per_segment, with_all)
        for label, sae in saes.items():
            recon[label].add(sae, a, rec_groups, cluster[i:i + a.shape[0]])
    conds = {label: Condition("sae", label) for label in saes}
    return results_of(recon, DocumentSums(n_docs + 1), conds, False, n_docs, n_bootstrap, bootstrap_seed,
                      token_counts(segs), NOT_SPLICED)
