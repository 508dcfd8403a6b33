"""The SAE × held-out data matrix: what ``dsae eval`` and ``dsae eval --activations`` run.

    eval_matrix(saes: SAESet, data: HeldoutData, cfg: EvalConfig, *, lm=None, out_dir=None) -> eval.json dict

1. ``cfg.hook``, when given, places every SAE at that hook; the null held-out options of ``cfg`` (model, context
   size, BOS, holdout fraction) are filled from the SAEs' metadata (:meth:`.sae_set.SAESet.heldout_config`).
2. The data: a live sample per dataset spec (the model is loaded, or ``lm`` reused), or the held-out caches, each
   opened once per hook and refused when it holds another sample (:mod:`.heldout_data`).
3. The one compatibility check (:meth:`.sae_set.SAESet.check`) against the model, or against each cache's model
   and widths, before any SAE runs.
4. Live: every (hook, training mask) group of SAEs on every dataset with :func:`.lm_metrics.evaluate_saes_on_tokens`
   (CE / KL with the SAE spliced in, reconstruction, per segment, bootstrap error bars over documents). Cached:
   :func:`.cache_eval.evaluate_saes_on_cache`, the reconstruction metrics from the same definitions without a model
   (eval.json says ``splice: "not_spliced"``; the CE / KL columns stay empty).
5. With ``out_dir``: eval.json, eval.md, heatmaps and density histograms (refused before anything runs when
   ``out_dir`` is not a new or an earlier eval directory). Deterministic: the same inputs give byte-identical
   eval.json and eval.md.
"""

from __future__ import annotations

import dataclasses
import platform
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from ..models.hooks import hook_d_in, resolve_hook
from ..models.load import as_module, load_model, resolve_device
from ..util.outdirs import check_output_dir, prepare_output_dir
from . import report
from .cache_eval import NOT_SPLICED, evaluate_saes_on_cache
from .heldout_data import HeldoutData, HeldoutSet
from .lm_metrics import SAEResult, evaluate_saes_on_tokens, splice_description
from .sae_set import SAESet

__all__ = ["eval_matrix", "HEATMAPS", "RECONSTRUCTION_HEATMAPS"]

# (metric key, file stem, title, value format, colorbar label)
HEATMAPS = [
    ("metrics/ce_loss_score", "ce_loss_score", "CE loss score (higher is better; 1 = no loss increase)",
     "{:.3f}", "(CE_abl - CE_SAE) / (CE_abl - CE_clean)"),
    ("metrics/delta_loss", "delta_loss", "Δ CE loss with SAE spliced in, nats (lower is better)", "{:.4f}",
     "CE_SAE - CE_clean (nats)"),
    ("metrics/kl_div_score", "kl_div_score", "KL score (higher is better)", "{:.3f}",
     "(KL_abl - KL_SAE) / KL_abl"),
    ("metrics/explained_variance", "explained_variance", "Explained variance (float64, whole eval set)", "{:.3f}",
     "1 - Σ||x - x̂||² / Σ||x - x̄||²"),
    ("metrics/l0", "l0", "L0: active latents per token", "{:.1f}", "mean #{i : f_i > 0}"),
    ("sparsity/dead_fraction", "dead_fraction", "Dead fraction: latents never fired on the eval set", "{:.3f}",
     "dead latents / d_sae"),
]
RECONSTRUCTION_HEATMAPS = [h for h in HEATMAPS if not h[0].startswith(("metrics/ce_", "metrics/kl_",
                                                                       "metrics/delta_loss"))]
CACHE_BATCH_SIZE = 32  # cached sequences per SAE encode when no batch size is given


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist, key in [("transformers", "transformers"), ("domain-sae", "domain-sae"), ("numpy", "numpy")]:
        try:
            out[key] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            out[key] = "not installed"
    return out


def _histogram(log10_density: Tensor, lo: float = -10.0, hi: float = 0.0, width: float = 0.25):
    n_bins = int(round((hi - lo) / width))
    edges = torch.linspace(lo, hi, n_bins + 1, dtype=torch.float64)
    v = log10_density.to(torch.float64).clamp(lo, hi)
    idx = torch.clamp(((v - lo) / width).floor().long(), 0, n_bins - 1)
    counts = torch.bincount(idx, minlength=n_bins)
    return [round(float(e), 6) for e in edges], [int(c) for c in counts]


def _load_lm(cfg: Any) -> Any:
    return load_model(cfg.model, device=resolve_device(cfg.device), dtype=getattr(torch, cfg.model_dtype))


def result_row(label: str, ds: HeldoutSet, hook_name: str, r: SAEResult) -> dict:
    """One eval.json result."""
    hist = _histogram(r.log10_feature_density)
    return {"sae": label, "dataset": ds.label, "hook": hook_name, "splice": r.splice, "metrics": dict(r.metrics),
            "errors": r.errors, "segments": r.segments, "tokens": r.tokens, "sampling": ds.sampling,
            "log10_density_histogram": {"bin_edges": hist[0], "counts": hist[1]}}


def write_plots(rows_by_key, sae_labels, ds_labels, out_dir: Path, heatmaps=HEATMAPS) -> dict:
    files: dict[str, dict] = {"heatmaps": {}, "density": {}}
    for key, stem, title, value_format, cbar in heatmaps:
        cells = [[rows_by_key[(s, d)] for d in ds_labels] for s in sae_labels]
        values = [[c["metrics"].get(key) for c in row] for row in cells]
        errors = [[c["errors"].get("overall", {}).get(key, {}).get("se") for c in row] for row in cells]
        name = f"heatmap_{stem}.png"
        report.plot_heatmap(values, sae_labels, ds_labels, title, out_dir / name, value_format=value_format,
                            colorbar_label=cbar, errors=errors)
        files["heatmaps"][key] = name
    for i, d in enumerate(ds_labels):
        name = f"density_{i}.png"
        hists = {s: (rows_by_key[(s, d)]["log10_density_histogram"]["bin_edges"],
                     rows_by_key[(s, d)]["log10_density_histogram"]["counts"]) for s in sae_labels}
        report.plot_density_histograms(hists, f"Latent firing density on {d} (held-out)", out_dir / name)
        files["density"][d] = name
    return files


def eval_summary(cfg, model_info: dict, hooks, heldout_record, batch_size, info, ds_info, results, files,
                 splice: str) -> dict:
    """The eval.json structure."""
    return {
        "format": "domain-sae-eval/2",
        "model": model_info,
        "hooks": sorted(set(hooks)),
        "config": dataclasses.asdict(cfg),
        "heldout": heldout_record,
        "splice": splice,
        "error_bars": {"method": "bootstrap over documents", "replicates": cfg.n_bootstrap, "seed": cfg.seed},
        "batch_size": batch_size,
        "mean_ablation": cfg.mean_ablation,
        "seeds": {"eval_seed": cfg.seed, "heldout_seed": cfg.heldout_seed,
                  "sae_training_seeds": {k: v["metadata"].get("seed") for k, v in info.items()}},
        "versions": versions(),
        "datasets": ds_info,
        "saes": info,
        "results": results,
        "files": files,
    }


def _live(saes: SAESet, data: HeldoutData, cfg, lm, batch_size: int, allow_model_mismatch: bool):
    """(rows by (SAE, dataset), datasets, eval.json's saes, model info) on the live model."""
    lm = lm if lm is not None else _load_lm(cfg)
    model = as_module(lm)
    saes.check(model=lm.name, width=lambda h: int(hook_d_in(model, resolve_hook(model, h))),
               allow_model_mismatch=allow_model_mismatch)
    saes.to(next(model.parameters()).device)
    groups = saes.groups(cfg.exclude_special_tokens)
    splice = {e.label: splice_description(cfg.splice_all_positions, e.exclude_special(cfg.exclude_special_tokens))
              for e in saes}
    sets = data.sets(cfg, tokenizer=lm.tokenizer)
    rows: dict[tuple[str, str], dict] = {}
    for ds in sets:
        for (hook_name, exclude), group in groups.items():
            res = evaluate_saes_on_tokens(group, lm, hook_name, ds.input_ids, ds.segments, batch_size=batch_size,
                                          mean_ablation=cfg.mean_ablation, per_segment=True, doc_ids=ds.doc_ids,
                                          exclude_special=exclude, splice_all_positions=cfg.splice_all_positions,
                                          n_bootstrap=cfg.n_bootstrap, bootstrap_seed=cfg.seed)
            rows.update({(label, ds.label): result_row(label, ds, hook_name, r) for label, r in res.items()})
    model_info = {"name": lm.name, "source": lm.source, "family": lm.family,
                  "dtype": str(next(model.parameters()).dtype)}
    return rows, sets, {e.label: e.describe(splice[e.label]) for e in saes}, model_info


def _cached(saes: SAESet, data: HeldoutData, cfg, batch_size: int, allow_model_mismatch: bool):
    """The same as :func:`_live` from held-out activation caches (reconstruction metrics only)."""
    sets = data.sets(cfg, hooks=saes.hooks)
    for ds in sets:
        saes.check(model=ds.model, width=ds.width, allow_model_mismatch=allow_model_mismatch)
    rows: dict[tuple[str, str], dict] = {}
    for ds in sets:
        for hook_name in saes.hooks:
            res = evaluate_saes_on_cache(saes.at(hook_name), ds, hook_name, batch_size=batch_size,
                                         n_bootstrap=cfg.n_bootstrap, bootstrap_seed=cfg.seed)
            rows.update({(label, ds.label): result_row(label, ds, hook_name, r) for label, r in res.items()})
    first = next(iter(sets[0].caches.values()))
    model_info = {"name": first.model, "source": "activation cache", "family": None, "dtype": first.manifest["dtype"]}
    return rows, sets, {e.label: e.describe(NOT_SPLICED) for e in saes}, model_info


def eval_matrix(saes: SAESet, data: HeldoutData, cfg: Any, *, lm: Any = None, out_dir: Optional[str | Path] = None,
                batch_size: Optional[int] = None, allow_model_mismatch: bool = False) -> dict:
    """Every SAE of ``saes`` on every held-out set of ``data`` (module docstring); ``cfg``: an
    :class:`~domain_sae.config.EvalConfig`; ``lm``: a loaded model to reuse (live data only); ``batch_size``:
    sequences per forward (default ``cfg.model_batch_size``; 32 cached sequences per encode from a cache).

    Returns the eval.json structure (``results``: one row per SAE × dataset with ``metrics``, ``errors``,
    ``segments``, ``tokens``); with ``out_dir``, also writes eval.json, eval.md and the figures there."""
    saes = saes.at_hook(cfg.hook)
    cfg, heldout_record = saes.heldout_config(
        cfg, model_name=None if lm is None or data.from_cache else lm.name)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        check_output_dir(out, "eval", option="--out")  # refuse now; create only once every check has passed
    if data.from_cache:
        batch_size = int(batch_size or CACHE_BATCH_SIZE)
        rows, sets, info, model_info = _cached(saes, data, cfg, batch_size, allow_model_mismatch)
        splice, heatmaps = NOT_SPLICED, RECONSTRUCTION_HEATMAPS
    else:
        batch_size = int(batch_size or cfg.model_batch_size)
        rows, sets, info, model_info = _live(saes, data, cfg, lm, batch_size, allow_model_mismatch)
        splice, heatmaps = ("all_positions" if cfg.splice_all_positions else "training_mask"), HEATMAPS
    ds_labels = [ds.label for ds in sets]
    results = [rows[(s, d)] for s in saes.labels for d in ds_labels]
    files: dict = {}
    if out is not None:
        prepare_output_dir(out, "eval", option="--out")
        files = write_plots(rows, saes.labels, ds_labels, out, heatmaps)
    summary = report.jsonable(eval_summary(cfg, model_info, saes.hooks, heldout_record, batch_size, info,
                                           {ds.label: ds.record() for ds in sets}, results, files, splice))
    if out is not None:
        report.write_json(out / "eval.json", summary)
        (out / "eval.md").write_text(report.eval_markdown(summary))
    return summary
