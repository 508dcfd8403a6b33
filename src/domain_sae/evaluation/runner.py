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
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..errors import UserError
from ..models.names import same_model_name
from . import report
from .lm_metrics import SAEResult, evaluate_saes_on_tokens, token_counts

__all__ = ["EvalError", "EvalCompatibilityError", "evaluate", "evaluate_sae", "make_evaluator", "eval_matrix",
           "check_sae_compatible", "same_model_name", "HEATMAPS", "TRAINING_LOG_KEYS"]


class EvalError(UserError):
    """An evaluation that cannot run as asked (no SAEs, no datasets, unusable held-out data)."""


class EvalCompatibilityError(EvalError):
    """An SAE that does not fit the model it is evaluated on (d_in, model name or hook)."""


# Keys the trainer also logs with a training-batch meaning (SPEC sections 1 and 3); the evaluator returns its
# held-out values of these under "heldout/<name>" so they do not overwrite the training-batch values.
TRAINING_LOG_KEYS = ("metrics/explained_variance", "metrics/explained_variance_std", "metrics/l0",
                     "metrics/mean_log10_feature_sparsity", "sparsity/")

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
    return out


def evaluate_sae(sae: Any, lm: Any, hook: Any, input_ids: Tensor, segments: Tensor, *, batch_size: int = 8,
                 mean_ablation: bool = False, per_segment: bool = True) -> dict:
    """All metrics of ``sae`` spliced at ``hook`` (a HookPoint or its name) of ``lm`` (LoadedModel or module) on
    ``input_ids``/``segments`` [N, T]: a flat dict of SPEC section 3 keys (``metrics/...``, ``sparsity/...``),
    token counts (``tokens/...``) and, with ``per_segment``, ``segments``: {segment name: same keys}."""
    res = evaluate_saes_on_tokens({"sae": sae}, lm, hook, input_ids, segments, batch_size=batch_size,
                                  mean_ablation=mean_ablation, per_segment=per_segment)["sae"]
    return _flatten(res, per_segment)


evaluate = evaluate_sae  # the name used in docs/architecture.md


def make_evaluator(lm: Any, hook: Any, input_ids: Tensor, segments: Tensor, *, batch_size: int = 8,
                   mean_ablation: bool = False) -> Callable[[Any], dict[str, float]]:
    """``evaluator(sae) -> dict[str, float]`` on this fixed held-out batch, for the trainer.

    Same computation as :func:`evaluate_sae` (and ``dsae eval``). The LM metrics keep their SPEC names
    (``metrics/ce_loss_score``, ``metrics/ce_loss_without_sae``, ...); the keys the trainer also logs with a
    training-batch meaning (:data:`TRAINING_LOG_KEYS`: explained variance, L0, ``sparsity/...``) are returned as
    ``heldout/<name without prefix>`` (e.g. ``heldout/explained_variance``, ``heldout/dead_features``).
    """
    ids = torch.as_tensor(input_ids).clone()
    segs = torch.as_tensor(segments).clone()

    def evaluator(sae: Any) -> dict[str, float]:
        flat = evaluate_sae(sae, lm, hook, ids, segs, batch_size=batch_size, mean_ablation=mean_ablation,
                            per_segment=False)
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

def _metadata(sae: Any) -> dict:
    meta = getattr(getattr(sae, "cfg", None), "metadata", None)
    if meta is None:
        return {}
    if isinstance(meta, dict):
        return meta
    if dataclasses.is_dataclass(meta):
        return dataclasses.asdict(meta)
    return dict(vars(meta))


def _sae_dims(sae: Any) -> tuple[int, int]:
    cfg = getattr(sae, "cfg", None)
    d_in, d_sae = getattr(cfg, "d_in", None), getattr(cfg, "d_sae", None)
    if d_in is None or d_sae is None:
        d_sae, d_in = sae.W_dec.shape
    return int(d_in), int(d_sae)


def check_sae_compatible(sae: Any, label: str, *, model_names: Sequence[str], hook_name: str, hook_d_in: int,
                         allow_model_mismatch: bool = False) -> None:
    """Raise :class:`EvalCompatibilityError` when ``sae`` does not fit: its d_in differs from the hook's width, or
    its metadata names a different model (see :func:`same_model_name`) and ``allow_model_mismatch`` is False."""
    d_in, _ = _sae_dims(sae)
    meta = _metadata(sae)
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

def _unique_labels(paths: Sequence[str]) -> list[str]:
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


def _versions() -> dict[str, str]:
    from importlib import metadata
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist, key in [("transformers", "transformers"), ("domain-sae", "domain-sae"), ("numpy", "numpy")]:
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
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
    from ..models.load import load_model, resolve_device
    return load_model(cfg.model, device=resolve_device(cfg.device), dtype=getattr(torch, cfg.model_dtype))


def _heldout(cfg: Any, dataset: str, tokenizer: Any) -> tuple[Tensor, Tensor]:
    from ..data.pipeline import heldout_batch
    dcfg = dataclasses.replace(cfg, data=dataset)
    ids, segs = heldout_batch(dcfg, tokenizer, cfg.eval_tokens)
    if ids.numel() == 0:
        raise EvalError(f"The held-out split of dataset '{dataset}' is empty; raise holdout_fraction or use a "
                        f"larger dataset.")
    return ids, segs


def eval_matrix(sae_dirs: Sequence[str | Path], datasets: Sequence[str], cfg: Any, *, lm: Any = None,
                out_dir: str | Path, hook: Optional[str] = None, batch_size: Optional[int] = None,
                allow_model_mismatch: bool = False,
                heldout: Optional[Mapping[str, tuple[Tensor, Tensor]]] = None,
                saes: Optional[Sequence[Any]] = None) -> dict:
    """Evaluate every SAE on every dataset's held-out split; write eval.json, eval.md and PNGs to ``out_dir``.

    ``sae_dirs``: SAE directories (ours or SAELens's), loaded with ``sae.io.load_sae`` (or pass the loaded
    ``saes`` in the same order). ``datasets``: data specs (``chat``, ``code``, a file, a hub id); each one's
    held-out tokens come from ``data.pipeline.heldout_batch(replace(cfg, data=spec), tokenizer,
    cfg.eval_tokens)`` — the split ``dsae train`` sets aside — unless ``heldout`` maps the spec to
    ``(input_ids, segments)``. ``cfg``: an :class:`~domain_sae.config.EvalConfig` (model, device, dtype,
    context_size, eval_tokens, mean_ablation, model_batch_size = sequences per forward unless ``batch_size``).
    ``lm``: a loaded model to reuse (else ``cfg.model`` is loaded).

    Hooks: each SAE is evaluated at the hook named in its metadata (``cfg.hook`` when it names none); with
    ``hook`` given, every SAE whose metadata names a different hook is refused. SAEs are grouped by hook so the
    clean pass and the ablations run once per (dataset, hook). Every SAE is checked first
    (:func:`check_sae_compatible`): d_in against the hook's width and the metadata model name against the model.

    Returns the eval.json structure (``results``: one row per SAE × dataset with ``metrics``, ``segments``,
    ``tokens``). Deterministic: the same inputs give byte-identical eval.json and eval.md.
    """
    from ..models.hooks import hook_d_in, resolve_hook

    if not sae_dirs and not saes:
        raise EvalError("No SAE given; pass one or more SAE directories.")
    if not datasets:
        raise EvalError("No dataset given; pass --data chat, --data code or a file.")
    paths = [str(p) for p in sae_dirs] if sae_dirs else [f"sae_{i}" for i in range(len(saes))]
    if saes is None:
        from ..sae.io import load_sae
        saes = [load_sae(p) for p in paths]
    if len(saes) != len(paths):
        raise EvalError(f"{len(saes)} SAEs given for {len(paths)} paths.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    batch_size = int(batch_size or getattr(cfg, "model_batch_size", 8))

    lm = lm if lm is not None else _load_lm(cfg)
    model = lm if isinstance(lm, torch.nn.Module) else lm.model
    device = next(model.parameters()).device
    model_names = [getattr(lm, "name", None) or cfg.model]  # the model actually used

    sae_labels = _unique_labels(paths)
    info: dict[str, dict] = {}
    by_hook: dict[str, dict[str, Any]] = {}
    for label, path, sae in zip(sae_labels, paths, saes):
        meta = _metadata(sae)
        meta_hook = meta.get("hook_name")
        if hook is not None and meta_hook and meta_hook != hook:
            raise EvalCompatibilityError(f"SAE {label} was trained at hook '{meta_hook}' but --hook {hook} was "
                                         f"given; evaluate it at its own hook (drop --hook) or pick SAEs of "
                                         f"that hook.")
        hook_name = hook or meta_hook or cfg.hook
        hp = resolve_hook(model, hook_name)
        check_sae_compatible(sae, label, model_names=model_names, hook_name=hook_name,
                             hook_d_in=int(hook_d_in(model, hp)), allow_model_mismatch=allow_model_mismatch)
        if hasattr(sae, "to"):
            sae.to(device)
        d_in, d_sae = _sae_dims(sae)
        info[label] = {"path": path, "hook": hook_name, "d_in": d_in, "d_sae": d_sae,
                       "architecture": getattr(getattr(sae, "cfg", None), "architecture", None),
                       "trained_on": meta.get("dataset_path"), "model_name": meta.get("model_name"),
                       "metadata": meta}
        by_hook.setdefault(hook_name, {})[label] = sae

    ds_labels = _unique_labels([str(d) for d in datasets]) if len(set(map(str, datasets))) == len(datasets) \
        else [f"{d}#{i}" for i, d in enumerate(datasets)]
    ds_info: dict[str, dict] = {}
    rows_by_key: dict[tuple[str, str], dict] = {}
    histograms: dict[str, dict[str, tuple]] = {}
    for ds_label, spec in zip(ds_labels, datasets):
        if heldout is not None and spec in heldout:
            ids, segs = heldout[spec]
        else:
            ids, segs = _heldout(cfg, str(spec), lm.tokenizer)
        ids, segs = torch.as_tensor(ids), torch.as_tensor(segs)
        ds_info[ds_label] = {"spec": str(spec), "tokens": token_counts(segs.to(torch.int64))}
        histograms[ds_label] = {}
        for hook_name in sorted(by_hook):
            group = by_hook[hook_name]
            res = evaluate_saes_on_tokens(group, lm, hook_name, ids, segs, batch_size=batch_size,
                                          mean_ablation=bool(getattr(cfg, "mean_ablation", False)),
                                          per_segment=True)
            for label, r in res.items():
                hist = _histogram(r.log10_feature_density)
                histograms[ds_label][label] = hist
                rows_by_key[(label, ds_label)] = {
                    "sae": label, "dataset": ds_label, "hook": hook_name, "metrics": dict(r.metrics),
                    "segments": r.segments, "tokens": r.tokens,
                    "log10_density_histogram": {"bin_edges": hist[0], "counts": hist[1]}}
    results = [rows_by_key[(s, d)] for s in sae_labels for d in ds_labels]

    files = {"heatmaps": {}, "density": {}}
    for key, stem, title, value_format, cbar in HEATMAPS:
        values = [[rows_by_key[(s, d)]["metrics"].get(key) for d in ds_labels] for s in sae_labels]
        name = f"heatmap_{stem}.png"
        report.plot_heatmap(values, sae_labels, ds_labels, title, out_dir / name, value_format=value_format,
                            colorbar_label=cbar)
        files["heatmaps"][key] = name
    for i, d in enumerate(ds_labels):
        name = f"density_{i}_{re.sub(r'[^A-Za-z0-9_.-]+', '-', d)}.png"
        report.plot_density_histograms(histograms[d], f"Latent firing density on {d} (held-out)", out_dir / name)
        files["density"][d] = name

    summary = {
        "format": "domain-sae-eval/1",
        "model": {"name": getattr(lm, "name", cfg.model), "source": getattr(lm, "source", None),
                  "family": getattr(lm, "family", None), "dtype": str(next(model.parameters()).dtype)},
        "hooks": sorted(by_hook),
        "config": dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(vars(cfg)),
        "batch_size": batch_size,
        "mean_ablation": bool(getattr(cfg, "mean_ablation", False)),
        "seeds": {"eval_seed": getattr(cfg, "seed", None),
                  "sae_training_seeds": {k: v["metadata"].get("seed") for k, v in info.items()}},
        "versions": _versions(),
        "datasets": ds_info,
        "saes": info,
        "results": results,
        "files": files,
    }
    report.write_json(out_dir / "eval.json", summary)
    (out_dir / "eval.md").write_text(report.eval_markdown(report.jsonable(summary)))
    return report.jsonable(summary)
