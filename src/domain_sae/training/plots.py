"""Training curves (PNG) and the final summary table, both from the JSONL log records."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Optional

__all__ = ["plot_training_curves", "summary_table", "last_values"]

TOKENS = "details/n_training_tokens"

# (key, panel title, y label, log scale)
PANELS = [
    ("losses/mse_loss", "Reconstruction error", "MSE (sum over d_in, mean over tokens, training scale)", True),
    ("metrics/l0", "Sparsity", "L0 (active latents per token)", False),
    ("metrics/explained_variance", "Explained variance", "explained variance (fraction)", False),
    ("details/current_learning_rate", "Learning rate", "learning rate", False),
    ("sparsity/dead_features", "Dead latents", "latents not fired in dead_feature_window steps", False),
    ("metrics/ce_loss_score", "Held-out CE loss score", "CE loss score (fraction recovered)", False),
]

SUMMARY_KEYS = [
    ("details/n_training_tokens", "training tokens", "{:,.0f}"),
    ("losses/mse_loss", "MSE (training scale)", "{:.4g}"),
    ("losses/l1_loss", "L1 (unscaled)", "{:.4g}"),
    ("losses/kl_loss", "KL(p_clean || p_SAE), training batch (nats; objective kl, kl+mse)", "{:.4g}"),
    ("losses/overall_loss", "overall loss", "{:.4g}"),
    ("metrics/explained_variance", "explained variance (last training batch)", "{:.4f}"),
    ("metrics/l0", "L0 (last training batch)", "{:.2f}"),
    ("heldout/explained_variance", "explained variance (held-out)", "{:.4f}"),
    ("heldout/l0", "L0 (held-out)", "{:.2f}"),
    ("sparsity/dead_features", "dead latents", "{:.0f}"),
    ("metrics/mean_log10_feature_sparsity", "mean log10 latent density (last window)", "{:.3f}"),
    ("metrics/ce_loss_score", "CE loss score (held-out)", "{:.4f}"),
    ("metrics/ce_loss_with_sae", "CE with SAE (nats)", "{:.4f}"),
    ("metrics/ce_loss_without_sae", "CE clean (nats)", "{:.4f}"),
    ("metrics/kl_div_score", "KL score (held-out)", "{:.4f}"),
    ("details/current_learning_rate", "final learning rate", "{:.3g}"),
]


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            continue
        xs.append(float(r.get(TOKENS, r.get("step", 0))))
        ys.append(float(v))
    return xs, ys


def plot_training_curves(records: list[dict], path: str | Path, *, title: Optional[str] = None) -> Path:
    """Write a PNG with one panel per tracked quantity against training tokens; returns ``path``."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = [p for p in PANELS if _series(records, p[0])[0]]
    if not panels:
        panels = PANELS[:1]
    ncols = 3 if len(panels) > 4 else 2
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.6 * nrows), squeeze=False)
    for ax, (key, name, ylabel, logy) in zip(axes.flat, panels):
        xs, ys = _series(records, key)
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None, lw=1.4)
        if logy and ys and min(ys) > 0 and max(ys) / min(ys) > 20:  # log scale only over a wide range
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("training tokens")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def last_values(records: Iterable[dict]) -> dict[str, Any]:
    """For every key, its value in the last record that has it."""
    out: dict[str, Any] = {}
    for r in records:
        for k, v in r.items():
            if v is not None:
                out[k] = v
    return out


def summary_table(records: list[dict], extra: Optional[dict[str, Any]] = None) -> str:
    """Markdown table of the final value of the main metrics (the last logged value of each), plus ``extra``
    rows (name -> value) such as the activation scale or wall time."""
    last = last_values(records)
    lines = ["| quantity | value |", "|---|---|"]
    for key, name, fmt in SUMMARY_KEYS:
        if key in last:
            try:
                val = fmt.format(last[key])
            except (ValueError, TypeError):
                val = str(last[key])
            lines.append(f"| {name} (`{key}`) | {val} |")
    for name, v in (extra or {}).items():
        val = f"{v:.6g}" if isinstance(v, float) else str(v)
        lines.append(f"| {name} | {val} |")
    return "\n".join(lines)
