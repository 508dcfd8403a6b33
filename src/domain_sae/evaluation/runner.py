"""Evaluation entry points: one SAE on one token set, the trainer's evaluator, and the SAE × dataset matrix.

- :func:`evaluate_sae` — every metric of :mod:`.lm_metrics` / :mod:`.metrics` for one SAE as a flat dict with the
  SPEC section 3 names (``metrics/ce_loss_score``, ...), the token counts (``tokens/...``) and a ``segments``
  sub-dict (segment name -> the same keys).
- :func:`make_evaluator` — ``evaluator(sae) -> dict[str, float]`` for the trainer, the same code on a fixed
  held-out batch, so training logs and ``dsae eval`` agree on the same tokens.
- :func:`eval_matrix` — what ``dsae eval`` runs: loads SAEs, checks them against the model, evaluates every SAE
  on every dataset's held-out split and writes ``eval.json``, ``eval.md``, heatmaps and density histograms.
"""

from __future__ import annotations

import dataclasses
import platform
import re
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..config import DataConfig
from ..data.token_stream import heldout_batch
from ..data.sampling import HeldoutSample
from ..models.hooks import hook_d_in, resolve_hook
from ..models.load import load_model, resolve_device
from ..sae.io import load_sae
from ..util.outdirs import check_output_dir, prepare_output_dir
from ..models.names import same_model_name
from . import report
from .heldout import EvalError, resolve_eval_config, sae_metadata
from .lm_metrics import SAEResult, evaluate_saes_on_tokens, splice_description
from .patching import sae_widths, torch_module
from .positions import token_counts

__all__ = ["EvalError", "EvalCompatibilityError", "evaluate", "evaluate_sae", "make_evaluator", "eval_matrix",
           "check_sae_compatible", "same_model_name", "HEATMAPS", "TRAINING_LOG_KEYS"]


class EvalCompatibilityError(EvalError):
    """An SAE that does not fit the model it is evaluated on (d_in, model name or hook)."""


# Keys the trainer also logs with a training-batch meaning (SPEC sections 1 and 3); the evaluator returns its
# held-out values of these under "heldout/<name>" so they do not overwrite the training-batch values.
TRAINING_LOG_KEYS = ("metrics/explained_variance", "metrics/explained_variance_std", "metrics/l0",
                     "metrics/mean_log10_feature_sparsity", "sparsity/")

DEFAULT_HOOK = DataConfig.hook  # for an SAE whose metadata names no hook and no hook is given

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


evaluate = evaluate_sae  # the name used in docs/architecture.md


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


# ----------------------------------------------------------------------------------------------------------------
# Compatibility



def check_sae_compatible(sae: Any, label: str, *, model_names: Sequence[str], hook_name: str, hook_d_in: int,
                         allow_model_mismatch: bool = False) -> None:
    """Raise :class:`EvalCompatibilityError` when ``sae`` does not fit: its d_in differs from the hook's width, or
    its metadata names a different model (see :func:`same_model_name`) and ``allow_model_mismatch`` is False."""
    d_in, _ = sae_widths(sae)
    meta = sae_metadata(sae)
    trained_model = meta.get("model_name")
    if trained_model and not allow_model_mismatch and not any(same_model_name(trained_model, m)
                                                               for m in model_names if m):
        raise EvalCompatibilityError(
            f"SAE {label} was trained on model '{trained_model}' but the evaluation model is "
            f"'{model_names[0]}'. Evaluate it with --model {trained_model}, or evaluate only SAEs of this model.")
    if d_in != hook_d_in:
        raise EvalCompatibilityError(
            f"SAE {label} has d_in={d_in} but hook '{hook_name}' of the model has width {hook_d_in}. The SAE "
            f"belongs to another hook or model (its metadata says hook '{meta.get('hook_name')}', model "
            f"'{trained_model}'); pass the matching --hook/--model.")


# ----------------------------------------------------------------------------------------------------------------
# Matrix

def unique_labels(paths: Sequence[str]) -> list[str]:
    """Shortest trailing path parts that tell the paths apart (``runA/sae``, ``runB/sae``)."""
    parts = [Path(p).resolve().parts if Path(p).exists() else Path(p).parts for p in paths]
    parts = [p if p else (str(paths[i]),) for i, p in enumerate(parts)]
    depth = 1
    while True:
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels) or depth >= max(len(p) for p in parts):
            break
        depth += 1
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab if seen[lab] == 1 else f"{lab}#{seen[lab]}")
    return out


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


def _heldout(cfg: Any, dataset: str, tokenizer: Any):
    """The :class:`~domain_sae.data.sampling.HeldoutSample` of ``dataset`` (the one sampler of every evaluation)."""
    sample = heldout_batch(dataclasses.replace(cfg, data=dataset), tokenizer, cfg.eval_tokens)
    if sample.input_ids.numel() == 0:
        raise EvalError(f"The held-out split of dataset '{dataset}' is empty; raise holdout_fraction or use a "
                        f"larger dataset.")
    return sample


def _prepare_saes(saes, sae_labels, paths, model, model_names, cfg, hook, allow_model_mismatch):
    """Check every SAE against the model; (info per SAE, {(hook, exclude_special): {label: SAE}})."""
    device = next(model.parameters()).device
    info: dict[str, dict] = {}
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for label, path, sae in zip(sae_labels, paths, saes):
        meta = sae_metadata(sae)
        meta_hook = meta.get("hook_name")
        if hook is not None and meta_hook and meta_hook != hook:
            raise EvalCompatibilityError(f"SAE {label} was trained at hook '{meta_hook}' but --hook {hook} was "
                                         f"given; evaluate it at its own hook (drop --hook) or pick SAEs of "
                                         f"that hook.")
        hook_name = hook or meta_hook or DEFAULT_HOOK
        hp = resolve_hook(model, hook_name)
        check_sae_compatible(sae, label, model_names=model_names, hook_name=hook_name,
                             hook_d_in=int(hook_d_in(model, hp)), allow_model_mismatch=allow_model_mismatch)
        sae.to(device)
        d_in, d_sae = sae_widths(sae)
        exclude = bool(meta.get("exclude_special_tokens", cfg.exclude_special_tokens))
        info[label] = {"path": path, "hook": hook_name, "d_in": d_in, "d_sae": d_sae,
                       "architecture": sae.cfg.architecture,
                       "trained_on": meta.get("dataset_path"), "model_name": meta.get("model_name"),
                       "splice": splice_description(cfg.splice_all_positions, exclude), "metadata": meta}
        groups.setdefault((hook_name, exclude), {})[label] = sae
    return info, groups


def result_row(label: str, ds_label: str, hook_name: str, r: SAEResult, sampling: Optional[dict]) -> dict:
    """One eval.json result (``sampling``: the held-out sample's summary, or None)."""
    hist = _histogram(r.log10_feature_density)
    return {"sae": label, "dataset": ds_label, "hook": hook_name, "splice": r.splice, "metrics": dict(r.metrics),
            "errors": r.errors, "segments": r.segments, "tokens": r.tokens,
            "sampling": sampling,
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
        name = f"density_{i}_{re.sub(r'[^A-Za-z0-9_.-]+', '-', d)}.png"
        hists = {s: (rows_by_key[(s, d)]["log10_density_histogram"]["bin_edges"],
                     rows_by_key[(s, d)]["log10_density_histogram"]["counts"]) for s in sae_labels}
        report.plot_density_histograms(hists, f"Latent firing density on {d} (held-out)", out_dir / name)
        files["density"][d] = name
    return files


def eval_summary(cfg, model_info: dict, hooks, heldout_record, batch_size, info, ds_info, results, files) -> dict:
    """The eval.json structure."""
    return {
        "format": "domain-sae-eval/2",
        "model": model_info,
        "hooks": sorted(set(hooks)),
        "config": dataclasses.asdict(cfg),
        "heldout": heldout_record,
        "splice": "all_positions" if cfg.splice_all_positions else "training_mask",
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


def eval_matrix(sae_dirs: Sequence[str | Path], datasets: Sequence[str], cfg: Any, *, lm: Any = None,
                out_dir: str | Path, hook: Optional[str] = None, batch_size: Optional[int] = None,
                allow_model_mismatch: bool = False,
                heldout: Optional[Mapping[str, Any]] = None,
                saes: Optional[Sequence[Any]] = None) -> dict:
    """Evaluate every SAE on every dataset's held-out split; write eval.json, eval.md and PNGs to ``out_dir``.

    ``sae_dirs``: SAE directories (ours or SAELens's), loaded with ``sae.io.load_sae`` (or pass the loaded
    ``saes`` in the same order). ``cfg``: an :class:`~domain_sae.config.EvalConfig`; its null held-out options
    (model, context_size, prepend_bos, holdout_fraction) are filled from the SAEs' metadata by
    :func:`.heldout.resolve_eval_config` (documents held out for every SAE; refused when there are none).
    ``datasets``: data specs; each one's tokens come from ``data.pipeline.heldout_batch(replace(cfg, data=spec),
    tokenizer, cfg.eval_tokens)`` (windows from many documents of the held-out split), unless ``heldout`` maps
    the spec to a HeldoutSample or ``(input_ids, segments)`` (then each sequence is its own document).
    ``lm``: a loaded model to reuse (else ``cfg.model`` is loaded).

    Hooks: each SAE is evaluated at the hook named in its metadata (``hook`` or ``cfg.hook``, when given, refuses
    SAEs of another hook); SAEs are grouped by (hook, training mask) so the clean pass and the ablations run once
    per group. Splicing: at each SAE's training mask, or everywhere with ``cfg.splice_all_positions``. Every
    metric has a bootstrap standard error over documents (``cfg.n_bootstrap`` replicates, seed ``cfg.seed``).

    Returns the eval.json structure. Deterministic: the same inputs give byte-identical eval.json and eval.md.
    """
    if not sae_dirs and not saes:
        raise EvalError("No SAE given; pass one or more SAE directories.")
    if not datasets:
        raise EvalError("No dataset given; pass --data chat, --data code or a file.")
    paths = [str(p) for p in sae_dirs] if sae_dirs else [f"sae_{i}" for i in range(len(saes))]
    saes = [load_sae(p) for p in paths] if saes is None else list(saes)
    if len(saes) != len(paths):
        raise EvalError(f"{len(saes)} SAEs given for {len(paths)} paths.")
    sae_labels = unique_labels(paths)
    cfg, heldout_record = resolve_eval_config(cfg, saes, sae_labels, model_name=None if lm is None else lm.name)
    hook = hook or cfg.hook
    out_dir = Path(out_dir)
    check_output_dir(out_dir, "eval", option="--out")  # refuse now; create only once every check has passed
    batch_size = int(batch_size or cfg.model_batch_size)
    lm = lm if lm is not None else _load_lm(cfg)
    model = torch_module(lm)
    info, groups = _prepare_saes(saes, sae_labels, paths, model, [lm.name], cfg, hook, allow_model_mismatch)

    ds_labels = unique_labels([str(d) for d in datasets]) if len(set(map(str, datasets))) == len(datasets) \
        else [f"{d}#{i}" for i, d in enumerate(datasets)]
    ds_info: dict[str, dict] = {}
    rows_by_key: dict[tuple[str, str], dict] = {}
    for ds_label, spec in zip(ds_labels, datasets):
        given = None if heldout is None else heldout.get(spec)
        sample = _heldout(cfg, str(spec), lm.tokenizer) if given is None else given
        ids, segs = (torch.as_tensor(t) for t in sample)
        sample = sample if isinstance(sample, HeldoutSample) else None  # else a bare (ids, segs) pair
        doc_ids = None if sample is None else sample.doc_ids
        ds_info[ds_label] = {"spec": str(spec), "tokens": token_counts(segs.to(torch.int64)),
                             "sampling": sample.summary() if sample is not None else None}
        for (hook_name, exclude) in sorted(groups):
            res = evaluate_saes_on_tokens(groups[(hook_name, exclude)], lm, hook_name, ids, segs,
                                          batch_size=batch_size, mean_ablation=cfg.mean_ablation, per_segment=True,
                                          doc_ids=doc_ids, exclude_special=exclude,
                                          splice_all_positions=cfg.splice_all_positions,
                                          n_bootstrap=cfg.n_bootstrap, bootstrap_seed=cfg.seed)
            sampling = ds_info[ds_label]["sampling"]
            for label, r in res.items():
                rows_by_key[(label, ds_label)] = result_row(label, ds_label, hook_name, r, sampling)
    results = [rows_by_key[(s, d)] for s in sae_labels for d in ds_labels]
    prepare_output_dir(out_dir, "eval", option="--out")
    files = write_plots(rows_by_key, sae_labels, ds_labels, out_dir)
    model_info = {"name": lm.name, "source": lm.source, "family": lm.family,
                  "dtype": str(next(model.parameters()).dtype)}
    summary = eval_summary(cfg, model_info, [h for h, _ in groups], heldout_record, batch_size, info, ds_info,
                           results, files)
    report.write_json(out_dir / "eval.json", summary)
    (out_dir / "eval.md").write_text(report.eval_markdown(report.jsonable(summary)))
    return report.jsonable(summary)
