"""The study report's figures, one function per figure, drawn from the JSON-ready results dict. Every plot has a
title and axis labels with units. Figures are built with :class:`matplotlib.figure.Figure` (no pyplot state, no
GUI backend)."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from ..evaluation.report import plot_heatmap
from .config import CONTROL, GENERAL, finetuned_name, scratch_name
from .findings import CES, EV, FACTOR, L0, num, recon_spread, recon_value

HEATMAPS = [(CES, "CE-loss score (fraction of CE recovered)", "{:.3f}"),
            ("metrics/delta_loss", "Δ CE with SAE spliced in (nats/token)", "{:.3f}"),
            ("metrics/kl_div_score", "KL score (fraction)", "{:.3f}"),
            (EV, "explained variance (fraction)", "{:.3f}"),
            (L0, "L0 (active latents per token)", "{:.1f}")]


def save_figure(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    return path


def tokens_label(n: float) -> str:
    """25000 -> "25k", 2e6 -> "2M"."""
    return f"{n / 1e6:g}M" if n >= 1e6 else f"{n / 1e3:g}k" if n >= 1e3 else f"{n:g}"


def token_axis(ax, ticks: list) -> None:
    """Log x axis with major ticks at the token counts that were run (e.g. "25k"), no minor tick labels."""
    ticks = sorted({float(t) for t in ticks if t})
    ax.set_xscale("log")
    ax.set_xticks(ticks, labels=[tokens_label(t) for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())


def heatmaps(res: dict, out: Path) -> dict[str, Path]:
    """One SAE × eval-set heatmap per metric of :data:`HEATMAPS`."""
    saes, sets = list(res["matrix"]), [GENERAL, *res["domains"]]
    figs = {}
    for key, label, fmt in HEATMAPS:
        vals = [[res["matrix"][s].get(d, {}).get(key) for d in sets] for s in saes]
        name = "heatmap_" + key.split("/")[-1]
        figs[name] = plot_heatmap(vals, saes, [f"{d} held-out" for d in sets], f"{label}: SAE × eval set",
                                  out / f"{name}.png", value_format=fmt, colorbar_label=label)
    return figs


def _spread_band(ax, value: float, yard: float) -> None:
    if math.isfinite(yard):
        ax.axhspan(value - FACTOR * yard, value + FACTOR * yard, color="grey", alpha=0.15,
                   label=f"± {FACTOR:g}× seed-to-seed spread")


def _efficiency_panel(ax, res: dict, d: str, key: str, ylabel: str, band: bool) -> None:
    c, s, f = res["budgets"][d], scratch_name(d), finetuned_name(d)
    ax.plot(c["tokens"], [num(p.get(key)) for p in c["scratch"]], "o-", label=f"{d} from scratch")
    ax.plot(c["tokens"], [num(p.get(key)) for p in c["finetuned"]], "s-", label=f"general fine-tuned on {d}")
    gv = recon_value(res, GENERAL, d, key)
    ax.axhline(gv, color="grey", ls="--", label="general SAE (no fine-tuning)")
    if band:
        _spread_band(ax, gv, recon_spread(res, d))
    ax.plot([res["saes"][s]["training_tokens"]], [recon_value(res, s, d, key)], "k*", ms=12, label=f"{s} (main run)")
    ax.plot([res["saes"][f]["training_tokens"]], [recon_value(res, f, d, key)], "rP", ms=10, label=f"{f} (main run)")
    token_axis(ax, c["tokens"] + [res["saes"][s]["training_tokens"], res["saes"][f]["training_tokens"]])
    ax.set_xlabel(f"{d} training tokens (log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"Token efficiency on {d}: {'explained variance' if band else 'sparsity'}")
    ax.legend(fontsize=7)


def token_efficiency(res: dict, out: Path, doms: list[str]) -> Path:
    """Per domain: EV (top) and L0 (bottom) of scratch and fine-tuned SAEs against their token budget."""
    fig = Figure(figsize=(5.5 * len(doms), 7.5))
    axes = fig.subplots(2, len(doms), squeeze=False)
    for j, d in enumerate(doms):
        _efficiency_panel(axes[0][j], res, d, "explained_variance", f"explained variance on held-out {d} (fraction)",
                          True)
        _efficiency_panel(axes[1][j], res, d, "l0", "L0 (active latents per token)", False)
    return save_figure(fig, out / "token_efficiency.png")


def forgetting(res: dict, out: Path, doms: list[str]) -> Path:
    """EV on general held-out data of the fine-tuned SAEs against their fine-tuning budget."""
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    for d in doms:
        c = res["budgets"][d]
        ax.plot(c["tokens"], [num(p.get("explained_variance")) for p in c["finetuned_on_general"]], "o-",
                label=f"general fine-tuned on {d}")
    gv = recon_value(res, GENERAL, GENERAL)
    ax.axhline(gv, color="grey", ls="--", label="general SAE")
    _spread_band(ax, gv, recon_spread(res, GENERAL))
    token_axis(ax, [t for d in doms for t in res["budgets"][d]["tokens"]])
    ax.set_xlabel("fine-tuning tokens (log scale)")
    ax.set_ylabel("explained variance on general held-out (fraction)")
    ax.set_title("Forgetting: fine-tuned SAEs on general data")
    ax.legend(fontsize=8)
    return save_figure(fig, out / "forgetting.png")


def max_cosine(res: dict, out: Path) -> Path:
    """Histograms of each latent's nearest-latent decoder cosine, both ways, for every SAE pair."""
    pairs = res["overlap"]["pairs"]
    fig = Figure(figsize=(12, 4.2))
    axes = fig.subplots(1, 2)
    for name, p in pairs.items():
        for ax, key in zip(axes, ("max_cos_a_to_b", "max_cos_b_to_a")):
            ax.step(p[key]["hist_edges"][:-1], p[key]["hist_counts"], where="post", label=name)
    for ax, t in zip(axes, ("each latent of the first SAE → nearest in the second",
                            "each latent of the second SAE → nearest in the first")):
        ax.axvline(res["overlap"]["threshold"], color="k", ls=":", lw=0.8)
        ax.set_xlabel("max decoder cosine (unitless)")
        ax.set_ylabel("latents (count)")
        ax.set_title(f"Nearest-latent cosine: {t}", fontsize=10)
        ax.set_xlim(-0.2, 1.0)
    axes[1].legend(fontsize=7)
    return save_figure(fig, out / "max_cosine.png")


def matching(res: dict, out: Path) -> Path:
    """Fraction of latents matched one-to-one (Hungarian) per SAE pair; the seed control in grey."""
    pairs = res["overlap"]["pairs"]
    fig = Figure(figsize=(7, 0.45 * len(pairs) + 1.6))
    ax = fig.subplots()
    names = list(pairs)
    vals = [num((pairs[n].get("hungarian") or {}).get("matched_fraction")) for n in names]
    ax.barh(range(len(names)), vals, color=["#888888" if CONTROL in n else "#1f77b4" for n in names])
    ax.set_yticks(range(len(names)), labels=names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"fraction of latents matched one-to-one at cosine ≥ {res['overlap']['threshold']}")
    ax.set_ylabel("SAE pair")
    ax.set_title("Hungarian matching (grey: seed-vs-seed control)")
    return save_figure(fig, out / "matching.png")


def drift(res: dict, out: Path) -> Path:
    """Histogram of each fine-tuned latent's decoder cosine to its value in the general SAE."""
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    for name, dr in res["overlap"]["drift"].items():
        ax.step(dr["hist_edges"][:-1], dr["hist_counts"], where="post", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("cosine of each latent's decoder vector to its value before fine-tuning (unitless)")
    ax.set_ylabel("latents (count, log scale)")
    ax.set_title("Drift of fine-tuned latents from the general SAE")
    ax.legend(fontsize=8)
    return save_figure(fig, out / "drift.png")


def direction_capture(res: dict, out: Path) -> Path:
    """Relative error of the difference-of-means direction rebuilt from k decoder directions (top-k LS, OMP)."""
    fig = Figure(figsize=(12, 4.2))
    axes = fig.subplots(1, 2)
    for name, r in res["directions"]["per_sae"].items():
        axes[0].plot(r["ks"], r["topk_lstsq_rel_error"], label=name)
        axes[1].plot(r["ks"], r["omp_rel_error"], label=name)
    for ax, t in zip(axes, ("top-k latents by mean activation difference, least squares",
                            "orthogonal matching pursuit")):
        ax.set_xscale("log")
        ax.set_xlabel("k (decoder directions used, log scale)")
        ax.set_ylabel("relative error ‖d − D_k c‖ / ‖d‖ (unitless)")
        ax.set_title(f"Difference-of-means direction: {t}", fontsize=10)
        ax.set_ylim(0, 1.05)
    axes[1].legend(fontsize=7)
    return save_figure(fig, out / "direction_capture.png")


def steering(res: dict, out: Path) -> Path:
    """Per domain: CE change on held-out text against the steering strength, one line per direction."""
    st, doms = res["steering"], res["domains"]
    fig = Figure(figsize=(5.5 * len(doms), 4.2))
    axes = fig.subplots(1, len(doms), squeeze=False)
    for ax, d in zip(axes[0], doms):
        for name, per_dom in st["add"]["ce_change"].items():
            ax.plot(st["relative_strengths"], [num(v) for v in per_dom[d]], "o-", label=name)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("steering strength (× mean activation norm at the hook)")
        ax.set_ylabel(f"Δ CE on held-out {d} (nats/token)")
        ax.set_title(f"Adding a direction: effect on {d}")
    axes[0][-1].legend(fontsize=7)
    return save_figure(fig, out / "steering.png")


def make_plots(res: dict, out: Path) -> dict[str, Path]:
    """Every figure of the report as a PNG in ``out``; returns figure name -> path (figures without data are
    left out)."""
    figs = heatmaps(res, out)
    doms = [d for d in res["domains"] if d in res["budgets"]]
    if doms:
        figs["token_efficiency"] = token_efficiency(res, out, doms)
        figs["forgetting"] = forgetting(res, out, doms)
    if res["overlap"]["pairs"]:
        figs["max_cosine"] = max_cosine(res, out)
        figs["matching"] = matching(res, out)
    if res["overlap"]["drift"]:
        figs["drift"] = drift(res, out)
    if res["directions"]["per_sae"]:
        figs["direction_capture"] = direction_capture(res, out)
    if res["steering"]["add"].get("ce_change"):
        figs["steering"] = steering(res, out)
    return figs
