"""Writers for evaluation results: JSON, Markdown tables and PNG plots (matplotlib, Agg backend).

Nothing here computes a metric; :mod:`.matrix` passes the numbers in. Output is deterministic: no timestamps, NaN
written as ``null`` in JSON and ``n/a`` in tables, PNGs saved without creation dates.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from ..util.markdown import escape_markdown, markdown_cell
from ..util.jsonsafe import jsonable

__all__ = ["jsonable", "write_json", "fmt", "markdown_table", "eval_markdown", "plot_heatmap",
           "plot_density_histograms", "fmt_se", "LM_COLUMNS", "RECONSTRUCTION_COLUMNS", "MEAN_ABLATION_COLUMNS",
           "SEGMENT_COLUMNS"]

# (key, column header, format) of the two main tables of eval.md.
LM_COLUMNS = [
    ("metrics/ce_loss_score", "CE score", "{:.4f}"),
    ("metrics/delta_loss", "Δ CE (nats)", "{:.4f}"),
    ("metrics/ce_loss_without_sae", "CE clean", "{:.4f}"),
    ("metrics/ce_loss_with_sae", "CE SAE", "{:.4f}"),
    ("metrics/ce_loss_with_ablation", "CE zero-abl.", "{:.4f}"),
    ("metrics/kl_div_with_sae", "KL SAE", "{:.4f}"),
    ("metrics/kl_div_with_ablation", "KL zero-abl.", "{:.4f}"),
    ("metrics/kl_div_score", "KL score", "{:.4f}"),
    ("tokens/lm_counted", "CE tokens", "{:.0f}"),
]

RECONSTRUCTION_COLUMNS = [
    ("metrics/explained_variance", "EV", "{:.4f}"),
    ("metrics/explained_variance_per_token_mean", "EV/token mean", "{:.4f}"),
    ("metrics/explained_variance_std", "EV/token std", "{:.4f}"),
    ("metrics/mse", "MSE", "{:.4g}"),
    ("metrics/cossim", "cos", "{:.4f}"),
    ("metrics/l2_ratio", "L2 ratio", "{:.4f}"),
    ("metrics/relative_reconstruction_bias", "bias", "{:.4f}"),
    ("metrics/l0", "L0", "{:.2f}"),
    ("sparsity/dead_features", "dead", "{:.0f}"),
    ("sparsity/dense_features", "dense", "{:.0f}"),
    ("tokens/reconstruction_counted", "recon. tokens", "{:.0f}"),
]
HEADLINE_COLUMNS = LM_COLUMNS + RECONSTRUCTION_COLUMNS

MEAN_ABLATION_COLUMNS = [
    ("metrics/ce_loss_with_mean_ablation", "CE mean-abl.", "{:.4f}"),
    ("metrics/ce_loss_score_mean_ablation", "CE score (mean-abl.)", "{:.4f}"),
    ("metrics/kl_div_with_mean_ablation", "KL mean-abl.", "{:.4f}"),
    ("metrics/kl_div_score_mean_ablation", "KL score (mean-abl.)", "{:.4f}"),
]

SEGMENT_COLUMNS = [
    ("tokens/lm_counted", "CE tokens", "{:.0f}"),
    ("metrics/ce_loss_without_sae", "CE clean", "{:.4f}"),
    ("metrics/ce_loss_with_sae", "CE SAE", "{:.4f}"),
    ("metrics/delta_loss", "Δ CE", "{:.4f}"),
    ("metrics/ce_loss_score", "CE score", "{:.4f}"),
    ("metrics/kl_div_with_sae", "KL SAE", "{:.4f}"),
    ("tokens/reconstruction_counted", "recon. tokens", "{:.0f}"),
    ("metrics/explained_variance", "EV", "{:.4f}"),
    ("metrics/cossim", "cos", "{:.4f}"),
    ("metrics/l0", "L0", "{:.2f}"),
]


# ----------------------------------------------------------------------------------------------------------------
# JSON

def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.write_text(json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Markdown

def fmt(value: Any, spec: str = "{:.4f}") -> str:
    if value is None:
        return "n/a"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(v):
        return "n/a"
    return spec.format(v)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def fmt_se(value: Any, se: Any, spec: str = "{:.4f}") -> str:
    """``value ± se`` (the se in the same format), or the value alone when there is no finite se."""
    text = fmt(value, spec)
    if text == "n/a" or se is None or fmt(se, spec) == "n/a":
        return text
    return f"{text} ± {fmt(se, spec)}"


_SPLICE_TEXT = {
    "training_mask": "the SAE's reconstruction (and the zero/mean ablation) replaces the hook's output only at the "
                     "positions the SAE trains on (its training mask: no padding, no special tokens)",
    "all_positions": "the SAE's reconstruction (and the zero/mean ablation) replaces the hook's output at every "
                     "position, special tokens included (SAELens's convention, --splice-all-positions)",
    "not_spliced": "none: evaluated from a held-out activation cache (dsae eval --activations) without the model, "
                   "so only the reconstruction metrics are computed; the CE / KL columns are empty (evaluate "
                   "without --activations for them)",
}


def _intro(summary: dict) -> list[str]:
    model = summary.get("model", {})
    held = summary.get("heldout", {})
    bars = summary.get("error_bars", {})
    splice = summary.get("splice", "training_mask")
    return [
        f"Model: {markdown_cell(model.get('name'))} ({markdown_cell(model.get('family', '?'))}). "
        f"Evaluated on each dataset's held-out split, "
        f"restricted to documents held out for every SAE (hash < holdout_fraction = "
        f"{fmt(held.get('holdout_fraction'), '{:g}')}), deduplicated, sampled as windows of "
        f"{fmt(held.get('context_size'), '{:.0f}')} tokens from many documents (see the datasets table).", "",
        f"**Splice convention: {splice}**: {_SPLICE_TEXT.get(splice, splice)}.", "",
        "Headline numbers count content tokens (text, user, assistant, system); chat-template text and all counted "
        "tokens (`all_tokens`) are in the per-segment tables. Error bars: ± one standard error from a bootstrap "
        f"over documents ({bars.get('replicates')} replicates, seed {bars.get('seed')}); eval.json also holds "
        "95% percentile intervals.", "",
        "Definitions (SPEC section 3): CE = next-token cross-entropy in nats over counted positions (the target "
        "token is neither padding nor a special/chat-template-marker token); CE score = (CE_zero-abl - CE_SAE) / "
        "(CE_zero-abl - CE_clean); Δ CE = CE_SAE - CE_clean; KL = mean KL(p_clean || p_patched); KL score = "
        "(KL_zero-abl - KL_SAE) / KL_zero-abl; EV = 1 - Σ||x - x̂||² / Σ||x - x̄||² over the evaluated tokens (x̄ "
        "their mean), float64; dead = never fired on the evaluated tokens (no error bar: resampling documents "
        "only adds dead latents, so a bootstrap interval would sit above the value); dense = fired on more than 10% "
        "of them.",
    ]


def _dataset_rows(summary: dict) -> list[list[str]]:
    rows = []
    for label, d in summary.get("datasets", {}).items():
        t, smp = d.get("tokens", {}), d.get("sampling") or {}
        rows.append([markdown_cell(label), markdown_cell(d.get('spec')), fmt(t.get("tokens/sequences"), "{:.0f}"),
                     fmt(smp.get("documents"), "{:.0f}"), fmt(smp.get("heldout_documents"), "{:.0f}"),
                     fmt(smp.get("duplicates_removed"), "{:.0f}"), fmt(smp.get("max_tokens_per_document"), "{:.0f}"),
                     fmt(t.get("tokens/total"), "{:.0f}"), fmt(t.get("tokens/lm_counted_content"), "{:.0f}"),
                     fmt(t.get("tokens/reconstruction_counted_content"), "{:.0f}")])
    return rows


def _cells(block: dict, errors: dict, cols) -> list[str]:
    return [fmt_se(block.get(k), (errors.get(k) or {}).get("se"), f_) if not k.startswith("tokens/")
            else fmt(block.get(k), f_) for k, _, f_ in cols]


def eval_markdown(summary: dict) -> str:
    """eval.md from the eval.json structure written by :func:`.matrix.eval_matrix`."""
    results = summary.get("results", [])
    mean_abl = bool(summary.get("mean_ablation"))
    out = ["# SAE evaluation", ""] + _intro(summary)
    if mean_abl:
        out += ["", "Mean ablation (second baseline): the hook's output replaced by its mean over the evaluated "
                    "tokens; its scores use CE/KL with mean ablation in place of zero ablation."]
    out += ["", "## Datasets", "", markdown_table(
        ["dataset", "source", "sequences", "documents sampled", "held-out documents", "duplicates removed",
         "max tokens/document", "tokens", "CE tokens (content)", "reconstruction tokens (content)"],
        _dataset_rows(summary)), ""]
    out += ["## SAEs", "", markdown_table(
        ["SAE", "path", "hook", "d_in", "d_sae", "trained on", "splice"],
        [[markdown_cell(label), markdown_cell(s.get('path')), markdown_cell(s.get('hook')),
          fmt(s.get("d_in"), "{:.0f}"),
          fmt(s.get("d_sae"), "{:.0f}"), markdown_cell(s.get('trained_on')), s.get("splice", "")]
         for label, s in summary.get("saes", {}).items()]), ""]

    def table(cols, splice_col=False):
        rows = [[markdown_cell(r['sae']), markdown_cell(r['dataset'])] + ([r.get("splice", "")] if splice_col else [])
                + _cells(r["metrics"], (r.get("errors") or {}).get("overall", {}), cols)
                + [fmt(r["metrics"].get("tokens/documents"), "{:.0f}")] for r in results]
        return markdown_table(["SAE", "dataset"] + (["splice"] if splice_col else []) + [h for _, h, _ in cols]
                              + ["documents"], rows)

    out += ["## Language-model metrics (one row per SAE × dataset; content tokens)", "", table(LM_COLUMNS, True), ""]
    if mean_abl:
        out += ["### Mean-ablation baseline", "", table(MEAN_ABLATION_COLUMNS, True), ""]
    out += ["## Reconstruction metrics (one row per SAE × dataset; content tokens)", "",
            table(RECONSTRUCTION_COLUMNS), ""]
    for ds in summary.get("datasets", {}):
        seg_rows = []
        for r in (r for r in results if r["dataset"] == ds):
            segs = r.get("segments") or {}
            if len(segs) < 2:
                continue
            for name, block in segs.items():
                seg_rows.append([markdown_cell(r['sae']), markdown_cell(name)]
                                + _cells(block, (r.get("errors") or {}).get(name, {}),
                                                                 SEGMENT_COLUMNS))
        if seg_rows:
            out += [f"## Per segment: {escape_markdown(ds)}", "",
                    "CE/KL positions belong to the segment of the predicted (target) "
                    "token; reconstruction positions to the segment of their own token; `all_tokens` = content and "
                    "template together.", "", markdown_table(["SAE", "segment"] + [h for _, h, _ in SEGMENT_COLUMNS],
                                                             seg_rows), ""]
    figs = summary.get("files", {})
    if figs:
        out += ["## Figures", ""]
        out += [f"![{escape_markdown(name)}]({name})" for name in list(figs.get("heatmaps", {}).values())
                + list(figs.get("density", {}).values())]
        out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------------------
# Plots

def _plt():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=120, metadata={"Software": None})
    _plt().close(fig)
    return path


def plot_heatmap(values: Sequence[Sequence[Optional[float]]], row_labels: Sequence[str],
                 col_labels: Sequence[str], title: str, path: str | Path, *, value_format: str = "{:.3f}",
                 colorbar_label: str = "", cmap: str = "viridis",
                 errors: Optional[Sequence[Sequence[Optional[float]]]] = None) -> Path:
    """SAEs (rows) × datasets (columns) heatmap with each cell's value (and ``± errors``, its standard error,
    when given) written in it; missing values are grey."""
    import numpy as np
    plt = _plt()
    arr = np.array([[np.nan if v is None else float(v) for v in row] for row in values], dtype=float)
    n_r, n_c = arr.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * n_c + 3.0), max(2.5, 0.55 * n_r + 1.8)))
    masked = np.ma.masked_invalid(arr)
    cm = plt.get_cmap(cmap).with_extremes(bad="#d9d9d9")
    finite = arr[np.isfinite(arr)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    im = ax.imshow(masked, cmap=cm, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(n_c), labels=list(col_labels), rotation=20, ha="right")
    ax.set_yticks(range(n_r), labels=list(row_labels))
    ax.set_xlabel("evaluation dataset (held-out split)")
    ax.set_ylabel("SAE")
    ax.set_title(title)
    for i in range(n_r):
        for j in range(n_c):
            v = arr[i, j]
            text = "n/a" if not np.isfinite(v) else value_format.format(v)
            se = None if errors is None else errors[i][j]
            if np.isfinite(v) and se is not None and math.isfinite(float(se)):
                text += "\n± " + value_format.format(float(se))
            shade = 0.5 if not np.isfinite(v) else (v - vmin) / (vmax - vmin)
            ax.text(j, i, text, ha="center", va="center", fontsize=9,
                    color="black" if shade > 0.55 else "white")
    cb = fig.colorbar(im, ax=ax)
    if colorbar_label:
        cb.set_label(colorbar_label)
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_density_histograms(histograms: dict[str, tuple[Sequence[float], Sequence[float]]], title: str,
                            path: str | Path) -> Path:
    """Overlaid step histograms of per-latent log10 firing density, one per SAE: ``{label: (bin_edges, counts)}``
    over [-10, 0]. The first bin holds the never-fired latents (log10(0 + 1e-10) = -10); they are not drawn but
    counted in the legend, and the x-axis spans the bins that hold firing latents."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    lo = 0.0
    for label, (edges, counts) in histograms.items():
        edges, counts = list(edges), list(counts)
        dead = counts[0]
        ax.stairs(counts[1:], edges[1:], label=f"{label} ({dead} dead, not drawn)", linewidth=1.4)
        firing = [edges[i] for i in range(1, len(counts)) if counts[i] > 0]
        if firing:
            lo = min(lo, firing[0])
    ax.set_xlim(min(lo - 0.5, -1.0), 0.0)
    ax.set_xlabel("log10(firing density): fraction of evaluated tokens on which a latent fires")
    ax.set_ylabel("number of latents")
    ax.set_title(title)
    if histograms:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(path))
