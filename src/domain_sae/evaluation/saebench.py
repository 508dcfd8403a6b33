"""SAEBench core-eval JSON from a domain-sae ``eval.json`` (``dsae eval --format saebench``,
``dsae export saebench EVAL_JSON OUT``).

Layout: SAEBench's core evaluation output, ``CoreEvalOutput`` (repository adamkarvonen/SAEBench, files
``sae_bench/evals/core/eval_output.py``, ``sae_bench/evals/core/eval_config.py`` and
``sae_bench/evals/base_eval_output.py``, read at commit :data:`SCHEMA_COMMIT`, package sae-bench 0.6.0; the layout
last changed in 3b58c67, 2025-03-07). One file per (SAE, dataset) row of eval.json, named the way SAEBench names
its results (``{release}_{sae_id}_eval_results.json``, "/" -> "_"; here release = the SAE label, sae_id = the
dataset label), in ``OUT/core/`` (SAEBench's graphing helpers recognise a core result by "core" in its path).

Values (SAEBench name <- eval.json key of the row's ``metrics``; definitions in :mod:`.metrics` and
:mod:`.lm_metrics`; headline numbers of eval.json count content tokens):

- model_behavior_preservation: kl_div_score, kl_div_with_ablation, kl_div_with_sae <- ``metrics/<same name>``
  (zero ablation; KL(p_clean || p_patched) per counted position, averaged).
- model_performance_preservation: ce_loss_score, ce_loss_with_ablation, ce_loss_with_sae, ce_loss_without_sae
  <- ``metrics/<same name>``.
- reconstruction_quality: explained_variance <- ``metrics/explained_variance`` = 1 - Σ_t||x_t - x̂_t||² /
  Σ_t||x_t - x̄||²; explained_variance_legacy <- ``metrics/explained_variance_per_token_mean`` = mean_t (1 -
  ||x_t - x̂_t||² / ||x_t - x̄||²) (x̄ over all evaluated tokens; SAEBench takes it per batch); mse <-
  ``metrics/mse`` = (1/N) Σ_t ||x_t - x̂_t||²; cossim <- ``metrics/cossim``.
- shrinkage: l2_ratio <- ``metrics/l2_ratio``; relative_reconstruction_bias <-
  ``metrics/relative_reconstruction_bias``; l2_norm_in, l2_norm_out: not computed (null).
- sparsity: l0 <- ``metrics/l0``; l1: not computed (null).
- token_stats: total_tokens_eval_reconstruction <- ``tokens/lm_counted`` (positions of the CE / KL metrics);
  total_tokens_eval_sparsity_variance <- ``metrics/n_tokens`` (positions of the reconstruction metrics).
- misc_metrics: frac_alive = 1 - ``sparsity/dead_fraction``; freq_over_10_percent <- ``sparsity/dense_fraction``
  (fraction of latents with density > 0.1); freq_over_1_percent, normalized_freq_over_1_percent,
  normalized_freq_over_10_percent, average_max_encoder_cosine_sim, average_max_decoder_cosine_sim: not computed
  (null).

A value eval.json does not hold (NaN, or the CE / KL metrics of ``dsae eval --activations``) is null as well; every
null is listed in ``eval_result_unstructured.not_computed``. SAEBench's schema types these metrics as numbers, so a
strict SAEBench reader refuses a null: the file is for reading and comparing, not for re-validation by SAEBench.
``eval_result_details`` (per-latent statistics) is empty. ``sae_bench_commit_hash`` says the file was not made by
SAEBench; ``sae_lens_*`` are null (the SAE is not a SAELens release); ``datetime_epoch_millis`` is eval.json's
modification time and ``eval_id`` a UUID derived from eval.json's bytes, the SAE and the dataset, so the same
eval.json always gives the same files. ``eval_result_unstructured`` holds the standard errors and the whole
eval.json row.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError
from ..util.jsonsafe import write_json
from ..util.outdirs import new_output_dir

__all__ = ["SAEBenchExportError", "METRICS", "NOT_COMPUTED", "SCHEMA_COMMIT", "load_eval_json", "core_results",
           "write_saebench"]

SCHEMA_REPOSITORY = "adamkarvonen/SAEBench"
SCHEMA_COMMIT = "8042bb3828c6340da8d12062324e92b2077c571c"
SCHEMA_FILE = "sae_bench/evals/core/eval_output.py"
EVAL_FORMATS = ("domain-sae-eval/2",)
NOT_SAEBENCH = "not-run-by-saebench"

Source = str | Callable[[dict], Any] | None
# SAEBench category -> metric -> eval.json metrics key (or a function of the row's metrics; None: not computed)
METRICS: dict[str, dict[str, Source]] = {
    "model_behavior_preservation": {k: f"metrics/{k}" for k in ("kl_div_score", "kl_div_with_ablation",
                                                                 "kl_div_with_sae")},
    "model_performance_preservation": {k: f"metrics/{k}" for k in ("ce_loss_score", "ce_loss_with_ablation",
                                                                    "ce_loss_with_sae", "ce_loss_without_sae")},
    "reconstruction_quality": {"explained_variance": "metrics/explained_variance",
                               "explained_variance_legacy": "metrics/explained_variance_per_token_mean",
                               "mse": "metrics/mse", "cossim": "metrics/cossim"},
    "shrinkage": {"l2_norm_in": None, "l2_norm_out": None, "l2_ratio": "metrics/l2_ratio",
                  "relative_reconstruction_bias": "metrics/relative_reconstruction_bias"},
    "sparsity": {"l0": "metrics/l0", "l1": None},
    "token_stats": {"total_tokens_eval_reconstruction": "tokens/lm_counted",
                    "total_tokens_eval_sparsity_variance": "metrics/n_tokens"},
    "misc_metrics": {"freq_over_1_percent": None, "freq_over_10_percent": "sparsity/dense_fraction",
                     "normalized_freq_over_1_percent": None, "normalized_freq_over_10_percent": None,
                     "average_max_encoder_cosine_sim": None, "average_max_decoder_cosine_sim": None,
                     "frac_alive": lambda m: None if _number(m.get("sparsity/dead_fraction")) is None
                     else 1.0 - m["sparsity/dead_fraction"]},
}
NOT_COMPUTED = [f"{c}.{k}" for c, block in METRICS.items() for k, src in block.items() if src is None]
INTEGER_METRICS = ("total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance")


class SAEBenchExportError(UserError):
    """An eval.json that cannot be exported (missing, not JSON, not a domain-sae evaluation)."""


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def load_eval_json(path: str | Path) -> tuple[Path, dict, bytes]:
    """``(file, summary, raw bytes)`` of an eval.json (or of ``DIR/eval.json`` for an evaluation directory)."""
    p = Path(path)
    if p.is_dir() and (p / "eval.json").is_file():
        p = p / "eval.json"
    if not p.is_file():
        raise SAEBenchExportError(f"{p} does not exist (or is a directory without eval.json); give the eval.json "
                                  f"that `dsae eval --out DIR` wrote, DIR/eval.json.")
    raw = p.read_bytes()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise SAEBenchExportError(f"{p} is not a JSON file; give the eval.json that `dsae eval --out DIR` "
                                  f"wrote.") from None
    fmt = data.get("format") if isinstance(data, dict) else None
    if fmt not in EVAL_FORMATS:
        what = f"format {fmt!r}" if isinstance(fmt, str) else "no domain-sae format field"
        raise SAEBenchExportError(f"{p} is JSON but not a domain-sae evaluation this version reads ({what}; "
                                  f"expected {', '.join(EVAL_FORMATS)}); give the eval.json of `dsae eval`, or "
                                  f"evaluate again with this version.")
    if not isinstance(data.get("results"), list) or not data["results"]:
        raise SAEBenchExportError(f"{p} holds no evaluation results; run `dsae eval` again.")
    return p, data, raw


def _metrics(row_metrics: dict) -> tuple[dict, list[str]]:
    out, missing = {}, []
    for cat, block in METRICS.items():
        out[cat] = {}
        for name, src in block.items():
            v = None if src is None else src(row_metrics) if callable(src) else _number(row_metrics.get(src))
            if v is not None and name in INTEGER_METRICS:
                v = int(round(v))
            out[cat][name] = v
            if v is None:
                missing.append(f"{cat}.{name}")
    return out, missing


def _config(summary: dict, row: dict, metrics: dict) -> dict:
    n_seq = int((summary["datasets"].get(row["dataset"], {}).get("tokens") or {}).get("tokens/sequences") or 0)
    batch = int(summary.get("batch_size") or 1)
    batches = -(-n_seq // batch)
    lm_done = metrics["model_performance_preservation"]["ce_loss_with_sae"] is not None
    return {
        "model_name": (summary.get("model") or {}).get("name") or "",
        "llm_dtype": str((summary.get("model") or {}).get("dtype") or "").removeprefix("torch."),
        "batch_size_prompts": batch,
        "n_eval_reconstruction_batches": batches if lm_done else 0,
        "n_eval_sparsity_variance_batches": batches,
        "dataset": str(summary["datasets"].get(row["dataset"], {}).get("spec", row["dataset"])),
        "context_size": int((summary.get("config") or {}).get("context_size") or 0),
        "compute_kl": metrics["model_behavior_preservation"]["kl_div_with_sae"] is not None,
        "compute_ce_loss": lm_done,
        "compute_l2_norms": metrics["shrinkage"]["l2_ratio"] is not None,
        "compute_sparsity_metrics": metrics["sparsity"]["l0"] is not None,
        "compute_variance_metrics": metrics["reconstruction_quality"]["explained_variance"] is not None,
        "compute_featurewise_density_statistics": False,
        "compute_featurewise_weight_based_metrics": False,
        "exclude_special_tokens_from_reconstruction": row.get("splice") == "training_mask",
        "verbose": False,
    }


def _sae_cfg(info: dict) -> dict:
    meta = info.get("metadata") or {}
    cfg = {"architecture": info.get("architecture"), "d_in": info.get("d_in"), "d_sae": info.get("d_sae"),
           "hook_name": info.get("hook"), "model_name": info.get("model_name") or meta.get("model_name"),
           "context_size": meta.get("context_size"), "training_tokens": meta.get("training_tokens"),
           "dataset_path": meta.get("dataset_path"), "path": info.get("path"), "metadata": meta}
    return {k: v for k, v in cfg.items() if v is not None}


def core_results(path: str | Path) -> list[tuple[str, dict]]:
    """``[(file name, SAEBench core result)]``, one per result row of the eval.json at ``path``."""
    p, summary, raw = load_eval_json(path)
    digest = hashlib.sha256(raw).hexdigest()
    millis = int(p.stat().st_mtime * 1000)
    version = (summary.get("versions") or {}).get("domain-sae")
    out, names = [], set()
    for row in summary["results"]:
        metrics, missing = _metrics(row.get("metrics") or {})
        overall = (row.get("errors") or {}).get("overall") or {}
        errors = {f"{c}.{k}": _number((overall.get(src) or {}).get("se")) for c, block in METRICS.items()
                  for k, src in block.items() if isinstance(src, str) and src in overall}
        result = {
            "eval_type_id": "core",
            "eval_config": _config(summary, row, metrics),
            "eval_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"domain-sae-eval:{digest}:{row['sae']}:"
                                                          f"{row['dataset']}")),
            "datetime_epoch_millis": millis,
            "eval_result_metrics": metrics,
            "eval_result_details": [],
            "sae_bench_commit_hash": NOT_SAEBENCH,
            "sae_lens_id": None,
            "sae_lens_release_id": None,
            "sae_lens_version": None,
            "sae_cfg_dict": _sae_cfg((summary.get("saes") or {}).get(row["sae"]) or {}),
            "eval_result_unstructured": {
                "producer": {"tool": "domain-sae", "version": version},
                "schema": {"repository": SCHEMA_REPOSITORY, "commit": SCHEMA_COMMIT, "file": SCHEMA_FILE},
                "source": {"eval_json": str(p.resolve()), "sha256": digest, "format": summary["format"],
                           "sae": row["sae"], "dataset": row["dataset"], "hook": row.get("hook"),
                           "splice": row.get("splice")},
                "not_computed": missing,
                "standard_errors": errors,
                "domain_sae_row": row,
            },
        }
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{row['sae']}_{row['dataset']}".replace("/", "_"))
        name = name if name not in names else f"{name}_{len(out)}"
        names.add(name)
        out.append((f"{name}_eval_results.json", result))
    return out


def write_saebench(eval_json: str | Path, out: str | Path, *, overwrite: bool = False) -> list[Path]:
    """Write ``OUT/core/<sae>_<dataset>_eval_results.json`` for every row of ``eval_json`` (all at once: ``out``
    is replaced only when every file is written); refuses an existing ``out`` that is not an earlier SAEBench
    export, and an earlier one unless ``overwrite``. Returns the files written."""
    results = core_results(eval_json)  # reads and checks eval.json before anything is created
    out = Path(out)
    with new_output_dir(out, "saebench-export", overwrite=overwrite, option="OUT") as tmp:
        (tmp / "core").mkdir()
        for name, result in results:
            write_json(tmp / "core" / name, result)
    return [out / "core" / name for name, _ in results]
