"""The study report's figures, one function per figure, drawn from the JSON-ready results dict (results.json). Every
plot has a title and axis labels with units. Built with :class:`matplotlib.figure.Figure` (no pyplot state)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from ..evaluation.report import plot_heatmap
from .config import GENERAL, slug
from .findings import METRICS

COLORS = {"general": "tab:gray", "scratch": "tab:blue", "finetune": "tab:orange", "scratch_budget": "tab:cyan",
          "scratch_total": "tab:purple", "continue": "tab:brown", "residual": "tab:green", "finetune_kl": "tab:red"}
HEATMAPS = [("metrics/ce_loss_score", "CE-loss score (fraction of CE recovered)", "{:.3f}"),
            ("metrics/delta_loss", "Δ CE with SAE spliced in (nats/token)", "{:.3f}"),
            ("metrics/kl_div_score", "KL score (fraction)", "{:.3f}"),
            ("metrics/explained_variance", "explained variance (fraction)", "{:.3f}"),
            ("metrics/l0", "L0 (active latents per token)", "{:.1f}")]


def num(x: Any) -> float:
    """float, with None (a NaN in results.json) as NaN."""
    return math.nan if x is None else float(x)


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


def _mean_std(values: list) -> tuple[float, float]:
    v = [num(x) for x in values]
    m = sum(v) / len(v)
    return m, (math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0)


def answer(res: dict, out: Path) -> Path:
    """The answer at a glance: per hook and domain, the headline metric of general, scratch and every per-budget
    condition at the headline budget (mean over seeds, bars: std over seeds)."""
    cases = [(h, d, dom) for h, hr in res["hooks"].items() for d, dom in hr["findings"].items()]
    fig = Figure(figsize=(max(6.0, 2.6 * len(cases)), 4.4))
    ax = fig.subplots()
    labels, hb = [], res["config"]["headline_budget"] or max(res["config"]["budgets"])
    metric = next((k for k in METRICS if any(dom["metrics"].get(k, {}).get("gaps") for *_, dom in cases)), "ev")
    for i, (h, d, dom) in enumerate(cases):
        gaps = dom["metrics"].get(metric, {}).get("gaps") or {}
        first = next((g for g in gaps.values() if "general" in g), None)
        if first is None:
            continue
        bars = [("general", first["general"]), ("scratch", first["scratch"])]
        bars += [(k, r["values"]) for k, g in gaps.items() for r in g.get("budgets", []) if r["budget"] == hb]
        width = 0.8 / len(bars)
        for j, (kind, vals) in enumerate(bars):
            m, s = _mean_std(vals)
            ax.bar(i + (j - (len(bars) - 1) / 2) * width, m, width, yerr=s, color=COLORS.get(kind, "k"),
                   label=kind if i == 0 else None)
        labels.append(f"{d}\n{h}")
    ax.set_xticks(range(len(labels)), labels=labels, fontsize=8)
    ax.set_ylabel(f"{METRICS[metric]} on held-out domain data")
    ax.set_xlabel("domain and hook")
    ax.set_title(f"General, scratch and each condition at {hb:,} tokens ({METRICS[metric]})")
    ax.legend(fontsize=7)
    lo = min((b.get_height() for b in ax.patches), default=0.0)
    ax.set_ylim(max(0.0, lo - 0.1), None)
    return save_figure(fig, out / "answer.png")


def frontier(dom: dict, d: str, hook: str, path: Path) -> Path:
    """Metric against measured L0 per condition and seed (the sparsity ladder of each run)."""
    fig = Figure(figsize=(5.5 * len(dom["metrics"]), 4))
    axes = fig.subplots(1, len(dom["metrics"]), squeeze=False)
    for ax, (metric, m) in zip(axes[0], dom["metrics"].items()):
        for cond, seeds in m["frontiers"].items():
            kind = ("general" if cond == GENERAL else "residual" if "residual" in cond else
                    "finetune" if "→" in cond else "scratch")
            for i, (_, pts) in enumerate(sorted(seeds.items())):
                pts = sorted(pts, key=lambda p: p[0])
                ax.plot([p[0] for p in pts], [p[1][metric] for p in pts], "o-", color=COLORS[kind], alpha=0.7, lw=1,
                        ms=3, label=cond if i == 0 else None)
        ax.set_xscale("log")
        ax.set_xlabel("L0 (active latents per token, log scale)")
        ax.set_ylabel(METRICS[metric])
        ax.set_title(f"{d} held-out, {hook}", fontsize=9)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def gap(dom: dict, d: str, hook: str, path: Path) -> Path:
    """Fraction of the general-to-scratch gap closed against training tokens, per per-budget condition."""
    fig = Figure(figsize=(5.5 * len(dom["metrics"]), 4))
    axes = fig.subplots(1, len(dom["metrics"]), squeeze=False)
    for ax, (metric, m) in zip(axes[0], dom["metrics"].items()):
        ticks = []
        for kind, g in (m.get("gaps") or {}).items():
            rows = [r for r in g.get("budgets") or [] if r.get("defined")]
            if rows:
                b = [r["budget"] for r in rows]
                ticks += b
                ax.plot(b, [r["fraction"] for r in rows], "o-", color=COLORS.get(kind, "k"), label=kind)
                ax.fill_between(b, [r["low"] for r in rows], [r["high"] for r in rows], color=COLORS.get(kind, "k"),
                                alpha=0.2)
        for y in (0.0, 0.5, 0.9, 1.0):
            ax.axhline(y, color="k", ls=":" if y in (0.5, 0.9) else "-", lw=0.6)
        token_axis(ax, ticks or [1])
        ax.set_xlabel("training tokens of the condition (log scale)")
        ax.set_ylabel(f"fraction of the gap closed ({METRICS[metric]})")
        ax.set_title(f"{d}, {hook}" + (f", at L0 {m['l0']:.0f}" if m.get("l0") else ""), fontsize=9)
        if ticks:
            ax.legend(fontsize=7)
    return save_figure(fig, path)


def heatmaps(matrix: dict, sets: list[str], hook: str, out: Path, tag: str) -> dict[str, Path]:
    """One SAE × held-out-set heatmap per metric of :data:`HEATMAPS`."""
    figs = {}
    for key, label, fmt in HEATMAPS:
        vals = [[matrix[s].get(d, {}).get(key) for d in sets] for s in matrix]
        name = f"heatmap_{key.split('/')[-1]}_{tag}"
        figs[name] = plot_heatmap(vals, list(matrix), [f"{d} held-out" for d in sets], f"{label}: SAE × held-out set "
                                  f"({hook})", out / f"{name}.png", value_format=fmt, colorbar_label=label)
    return figs


def overlap(ov: dict, hook: str, out: Path, tag: str) -> dict[str, Path]:
    """Hungarian matched fraction per pair (seed controls grey) and the drift histogram of each fine-tune."""
    figs = {}
    pairs = ov["pairs"]
    fig = Figure(figsize=(7, 0.45 * len(pairs) + 1.6))
    ax = fig.subplots()
    names = list(pairs)
    ax.barh(range(len(names)), [num((pairs[n].get("hungarian") or {}).get("matched_fraction")) for n in names],
            color=["#888888" if "seed" in n else "#1f77b4" for n in names])
    ax.set_yticks(range(len(names)), labels=names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"fraction of latents matched one-to-one at cosine ≥ {ov['threshold']}")
    ax.set_ylabel("SAE pair")
    ax.set_title(f"Hungarian matching at {hook} (grey: seed-vs-seed controls)")
    figs[f"matching_{tag}"] = save_figure(fig, out / f"matching_{tag}.png")
    if ov.get("drift"):
        fig = Figure(figsize=(6.5, 4.2))
        ax = fig.subplots()
        for name, dr in ov["drift"].items():
            ax.step(dr["hist_edges"][:-1], dr["hist_counts"], where="post", label=name)
        ax.set_yscale("log")
        ax.set_xlabel("cosine of each latent's decoder vector to its value before fine-tuning (unitless)")
        ax.set_ylabel("latents (count, log scale)")
        ax.set_title(f"Drift of fine-tuned latents from the general SAE ({hook})")
        ax.legend(fontsize=8)
        figs[f"drift_{tag}"] = save_figure(fig, out / f"drift_{tag}.png")
    return figs


def direction_capture(dr: dict, hook: str, out: Path, tag: str) -> Path:
    """Relative error of the difference-of-means direction rebuilt from k decoder directions (top-k LS, OMP)."""
    fig = Figure(figsize=(12, 4.2))
    axes = fig.subplots(1, 2)
    for name, r in dr["per_sae"].items():
        axes[0].plot(r["ks"], r["topk_lstsq_rel_error"], label=name)
        axes[1].plot(r["ks"], r["omp_rel_error"], label=name)
    for ax, t in zip(axes, ("top-k latents by mean activation difference, least squares",
                            "orthogonal matching pursuit")):
        ax.set_xscale("log")
        ax.set_xlabel("k (decoder directions used, log scale)")
        ax.set_ylabel("relative error ‖d − D_k c‖ / ‖d‖ (unitless)")
        ax.set_title(f"Difference of means at {hook}: {t}", fontsize=9)
        ax.set_ylim(0, 1.05)
    axes[1].legend(fontsize=7)
    return save_figure(fig, out / f"direction_capture_{tag}.png")


def steering(st: dict, doms: list[str], hook: str, out: Path, tag: str) -> Path:
    """Per domain: CE change on held-out text against the steering strength, one line per direction."""
    fig = Figure(figsize=(5.5 * len(doms), 4.2))
    axes = fig.subplots(1, len(doms), squeeze=False)
    for ax, d in zip(axes[0], doms):
        for name, per_dom in st["add"]["ce_change"].items():
            ax.plot(st["relative_strengths"], [num(v) for v in per_dom[d]], "o-", label=name)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("steering strength (× mean activation norm at the hook)")
        ax.set_ylabel(f"Δ CE on held-out {d} (nats/token)")
        ax.set_title(f"Adding a direction at {hook}: effect on {d}", fontsize=9)
    axes[0][-1].legend(fontsize=7)
    return save_figure(fig, out / f"steering_{tag}.png")


def plateau_curves(conv: dict, hook: str, out: Path, tag: str) -> Path:
    """Held-out explained variance against training tokens (log axis) of every general and scratch SAE, one line
    per seed (same colour per condition), each labelled with its final slope per doubling and its stop."""
    fig = Figure(figsize=(7.5, 4.6))
    ax = fig.subplots()
    conds = list(dict.fromkeys(c["condition"] for c in conv["curves"].values()))
    palette = ["tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:red"]
    ticks = []
    for c in conv["curves"].values():
        pts = c.get("curve") or []
        if not pts:
            continue
        stop = c.get("stop") or {}
        slope = num(stop.get("slope_per_doubling"))
        t = [p["tokens"] for p in pts]
        ticks += [t[0], t[-1]]
        ax.plot(t, [p["ev"] for p in pts], "o-", ms=3, lw=1, color=palette[conds.index(c["condition"]) % 6],
                label=f"{c['condition']} s{c['seed']}: {slope:+.4f}/doubling, {stop.get('reason') or 'running'}"
                if math.isfinite(slope) else f"{c['condition']} s{c['seed']}: {stop.get('reason') or 'running'}")
    token_axis(ax, ticks or [1])
    ax.set_xlabel("training tokens (log scale)")
    ax.set_ylabel("held-out explained variance (own set, fraction)")
    ax.set_title(f"Reference SAEs trained to the plateau at {hook} (stop: slope < 0.005 per doubling)", fontsize=9)
    ax.legend(fontsize=6)
    return save_figure(fig, out / f"plateau_{tag}.png")


def make_figures(res: dict, out: Path) -> dict[str, Path]:
    """Every figure of the report as a PNG in ``out``: name -> path (figures without data are left out)."""
    figs = {"answer": answer(res, out)}
    doms = list(res["config"]["domains"])
    for hook, h in res["hooks"].items():
        tag = slug(hook)
        for d, dom in h["findings"].items():
            if dom["metrics"]:
                figs[f"frontier_{tag}_{d}"] = frontier(dom, d, hook, out / f"frontier_{tag}_{d}.png")
                figs[f"gap_{tag}_{d}"] = gap(dom, d, hook, out / f"gap_{tag}_{d}.png")
        a = h["analyses"]
        if any(c.get("curve") for c in (a.get("convergence") or {}).get("curves", {}).values()):
            figs[f"plateau_{tag}"] = plateau_curves(a["convergence"], hook, out, tag)
        if a.get("matrix"):
            figs.update(heatmaps(a["matrix"], [GENERAL, *doms], hook, out, tag))
        if (a.get("overlap") or {}).get("pairs"):
            figs.update(overlap(a["overlap"], hook, out, tag))
        if (a.get("directions") or {}).get("per_sae"):
            figs[f"direction_capture_{tag}"] = direction_capture(a["directions"], hook, out, tag)
        if ((a.get("steering") or {}).get("add") or {}).get("ce_change"):
            figs[f"steering_{tag}"] = steering(a["steering"], doms, hook, out, tag)
    return figs
