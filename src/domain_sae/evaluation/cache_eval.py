"""`dsae eval --activations CACHE`: the reconstruction metrics of SAEs on a held-out activation cache, no model.

The cache (`dsae cache --split heldout`, :mod:`domain_sae.activations.heldout_cache`) holds the evaluation's own
held-out sample (the windows ``data.pipeline.heldout_batch`` draws) and its activations at each hook, so the
reconstruction metrics computed here (explained variance, MSE, cosine, L0, dead / dense latents, per segment,
bootstrap error bars over documents) are those of `dsae eval` on the live model, from the same definitions
(:class:`.lm_metrics.ReconstructionSums`, :func:`.lm_metrics.group_means`), without running the model. The CE / KL
metrics need the model's later layers with the SAE spliced in, so they are not computed (eval.json records
``splice: "not_spliced"``); evaluate without ``--activations`` for them.

Refused before any SAE is encoded: a training-split, unfinished or corrupt cache; a cache without the SAE's hook;
an SAE of another model or width; and a cache whose held-out sample differs from the one the SAEs' evaluation
would draw (another holdout_fraction, context size, seed, ... as :func:`.heldout.resolve_eval_config` resolves
them from the SAEs' metadata: those could be some SAE's training documents).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from ..activations.heldout_cache import HeldoutCache, heldout_data_mismatch, open_heldout_cache
from ..util.outdirs import check_output_dir, prepare_output_dir
from ..sae.io import load_sae
from . import report
from .heldout import EvalError, resolve_eval_config, sae_metadata
from .lm_metrics import ReconstructionSums, SAEResult, clusters, group_means, results_of
from .metrics import MetricError
from .patching import sae_widths
from .positions import OVERALL, groups, has_template, reconstruction_positions, token_counts
from .runner import (DEFAULT_HOOK, HEATMAPS, EvalCompatibilityError, eval_summary, result_row, unique_labels,
                     write_plots)
from .uncertainty import DocumentSums

__all__ = ["evaluate_saes_on_cache", "eval_matrix_from_cache", "NOT_SPLICED", "RECONSTRUCTION_HEATMAPS"]

NOT_SPLICED = "not_spliced"
RECONSTRUCTION_HEATMAPS = [h for h in HEATMAPS if not h[0].startswith(("metrics/ce_", "metrics/kl_",
                                                                       "metrics/delta_loss"))]


@torch.no_grad()
def evaluate_saes_on_cache(saes: Mapping[str, Any], cache: HeldoutCache, *, batch_size: int = 32,
                           per_segment: bool = True, n_bootstrap: int = 0, bootstrap_seed: int = 0
                           ) -> dict[str, SAEResult]:
    """label -> :class:`SAEResult` (reconstruction metrics only) of every SAE in ``saes`` on ``cache``."""
    if not saes:
        raise MetricError("No SAE to evaluate.")
    segs = cache.segments.to(torch.int64)
    cluster, n_docs = clusters(cache.doc_ids)
    device = next(iter(saes.values())).W_dec.device

    def batches():
        for i, a in cache.batches(batch_size):  # NaN where the cache holds nothing: never a counted position
            yield i, torch.nan_to_num(a, nan=0.0).to(device), segs[i:i + a.shape[0]]

    means = group_means((a, s) for _, a, s in batches())
    if OVERALL not in means:
        raise MetricError(f"The cache {cache.path} holds no content token (text, user, assistant or system); "
                          f"build it from data with ordinary content.")
    recon = {label: ReconstructionSums(means, n_docs) for label in saes}
    with_all = per_segment and has_template(segs)
    for i, a, s in batches():
        rec_groups = groups(s, reconstruction_positions(s), per_segment, with_all)
        for label, sae in saes.items():
            recon[label].add(sae, a, rec_groups, cluster[i:i + a.shape[0]])
    conds = {label: f"sae:{label}" for label in saes}
    return results_of(recon, DocumentSums(n_docs + 1), conds, False, n_docs, n_bootstrap, bootstrap_seed,
                      token_counts(segs), NOT_SPLICED)


def _check_sae(cache: HeldoutCache, hook: str, sae, label: str, cfg) -> None:
    meta = sae_metadata(sae)
    d_in, _ = sae_widths(sae)
    if d_in != cache.d_in:
        raise EvalCompatibilityError(f"SAE {label} has d_in={d_in} but hook '{hook}' of the cache {cache.path} has "
                                     f"width {cache.d_in}; evaluate it on a cache of its own model and hook.")
    problems = heldout_data_mismatch(cache, cfg, model=meta.get("model_name"))
    if problems:
        raise EvalError(f"The cache {cache.path} holds another held-out sample than the evaluation of SAE {label} "
                        f"draws: {'; '.join(problems)}. Build the cache with those options (dsae cache --split "
                        f"heldout ...), or pass them to dsae eval.")


def eval_matrix_from_cache(sae_dirs: Sequence[str | Path], caches: Sequence[str | Path], cfg: Any, *,
                           out_dir: str | Path, hook: Optional[str] = None, batch_size: Optional[int] = None,
                           saes: Optional[Sequence[Any]] = None, verify: bool = True) -> dict:
    """Every SAE on every held-out cache (one dataset each): eval.json, eval.md and the reconstruction heatmaps in
    ``out_dir``, as :func:`.runner.eval_matrix` writes them, with the CE / KL columns empty. Returns eval.json."""
    if not sae_dirs and not saes:
        raise EvalError("No SAE given; pass one or more SAE directories.")
    if not caches:
        raise EvalError("No activation cache given; pass --activations CACHE (built with dsae cache --split "
                        "heldout).")
    paths = [str(p) for p in sae_dirs] if sae_dirs else [f"sae_{i}" for i in range(len(saes))]
    saes = [load_sae(p) for p in paths] if saes is None else list(saes)
    sae_labels = unique_labels(paths)
    cfg, heldout_record = resolve_eval_config(cfg, saes, sae_labels)
    out_dir = Path(out_dir)
    check_output_dir(out_dir, "eval", option="--out")
    hooks = [hook or cfg.hook or sae_metadata(s).get("hook_name") or DEFAULT_HOOK for s in saes]
    # each (cache, hook) opened (and its checksums read) once, however many SAEs use it
    opened = {(str(c), h): open_heldout_cache(c, h, verify=verify) for c in caches for h in dict.fromkeys(hooks)}
    for c in caches:
        for s, lab, h in zip(saes, sae_labels, hooks):
            _check_sae(opened[(str(c), h)], h, s, lab, cfg)
    ds_labels = unique_labels([str(c) for c in caches])
    info = {lab: {"path": p, "hook": h, "d_in": sae_widths(s)[0], "d_sae": sae_widths(s)[1],
                  "architecture": s.cfg.architecture, "trained_on": sae_metadata(s).get("dataset_path"),
                  "model_name": sae_metadata(s).get("model_name"), "splice": NOT_SPLICED,
                  "metadata": sae_metadata(s)} for lab, p, s, h in zip(sae_labels, paths, saes, hooks)}
    ds_info, rows = {}, {}
    for ds_label, c in zip(ds_labels, caches):
        first = opened[(str(c), hooks[0])]
        ds_info[ds_label] = {"spec": first.data, "activation_cache": str(first.path),
                             "tokens_requested": first.manifest["tokens_requested"],
                             "tokens": token_counts(first.segments.to(torch.int64)),
                             "sampling": first.manifest.get("sampling")}
        for h in sorted(set(hooks)):
            group = {lab: s for lab, s, hh in zip(sae_labels, saes, hooks) if hh == h}
            res = evaluate_saes_on_cache(group, opened[(str(c), h)], batch_size=int(batch_size or 32),
                                         n_bootstrap=cfg.n_bootstrap, bootstrap_seed=cfg.seed)
            for lab, r in res.items():
                rows[(lab, ds_label)] = result_row(lab, ds_label, h, r, ds_info[ds_label]["sampling"])
    prepare_output_dir(out_dir, "eval", option="--out")
    files = write_plots(rows, sae_labels, ds_labels, out_dir, RECONSTRUCTION_HEATMAPS)
    first = next(iter(opened.values()))
    model_info = {"name": first.model, "source": "activation cache", "family": None,
                  "dtype": first.manifest["dtype"]}
    results = [rows[(s, d)] for s in sae_labels for d in ds_labels]
    summary = eval_summary(cfg, model_info, hooks, heldout_record, batch_size, info, ds_info, results, files)
    summary["splice"] = NOT_SPLICED
    report.write_json(out_dir / "eval.json", summary)
    (out_dir / "eval.md").write_text(report.eval_markdown(report.jsonable(summary)))
    return report.jsonable(summary)
