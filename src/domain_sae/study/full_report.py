"""Report of the rigorous study: results.json, report.md and PNG figures (EV/CE-score vs L0 frontiers per
condition and seed; the gap-closed curve against fine-tuning tokens with seed bands, next to token-matched scratch
SAEs)."""

from __future__ import annotations

import json
from pathlib import Path
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..markdown import escape_markdown as md_escape  # noqa: E402
from .config import GENERAL  # noqa: E402
from .full_analysis import METRICS  # noqa: E402

__all__ = ["write_full_report", "frontier_figure", "gap_figure"]

COLORS = {"general": "tab:gray", "scratch": "tab:blue", "finetuned": "tab:orange", "residual": "tab:green"}


def _kind(cond: str) -> str:
    if cond == GENERAL:
        return "general"
    if "residual" in cond:
        return "residual"
    return "finetuned" if "→" in cond else "scratch"


def frontier_figure(dom: dict, d: str, hook: str, path: Path) -> Path:
    fig, axes = plt.subplots(1, len(dom["metrics"]), figsize=(5.5 * len(dom["metrics"]), 4), squeeze=False)
    for ax, (metric, m) in zip(axes[0], dom["metrics"].items()):
        for cond, seeds in m["frontiers"].items():
            for i, (_, pts) in enumerate(sorted(seeds.items())):
                pts = sorted(pts, key=lambda p: p[0])
                ax.plot([p[0] for p in pts], [p[1][metric] for p in pts], "o-", color=COLORS[_kind(cond)],
                        alpha=0.7, lw=1, ms=3, label=cond if i == 0 else None)
        ax.set_xscale("log")
        ax.set_xlabel("L0 (log scale)")
        ax.set_ylabel(METRICS[metric])
        ax.set_title(f"{d} held-out, {hook}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def gap_figure(dom: dict, d: str, hook: str, path: Path) -> Path:
    fig, axes = plt.subplots(1, len(dom["metrics"]), figsize=(5.5 * len(dom["metrics"]), 4), squeeze=False)
    for ax, (metric, m) in zip(axes[0], dom["metrics"].items()):
        for key, label, color in (("gap_finetuned", f"general→{d} (+ tokens)", COLORS["finetuned"]),
                                  ("gap_scratch", f"{d} from scratch (tokens)", COLORS["scratch"])):
            rows = (m.get(key) or {}).get("budgets") or []
            if not rows:
                continue
            b = [r["budget"] for r in rows]
            ax.plot(b, [r["fraction"] for r in rows], "o-", color=color, label=label)
            ax.fill_between(b, [r["low"] for r in rows], [r["high"] for r in rows], color=color, alpha=0.2)
        for y in (0.5, 0.9):
            ax.axhline(y, color="k", ls=":", lw=0.8)
        ax.axhline(0, color="k", lw=0.5)
        ax.axhline(1, color="k", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("training tokens (log scale)")
        ax.set_ylabel(f"fraction of the gap closed ({METRICS[metric]})")
        l0 = m.get("l0")
        ax.set_title(f"{d}, {hook}" + (f", at L0 {l0:.0f}" if l0 else ""), fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _table_md(table: dict, metric: str) -> list[str]:
    if "unavailable" in table:
        return [f"(no common L0 range: {md_escape(table['unavailable'])})", ""]
    conds = [k for k in table["by_l0"][0] if k != "l0"]
    lines = ["| L0 | " + " | ".join(md_escape(c) for c in conds) + " |", "|---|" + "---|" * len(conds)]
    for row in table["by_l0"]:
        cells = [f"{row[c]['mean']:.3f} ± {row[c]['std']:.3f}" for c in conds]
        lines.append(f"| {row['l0']:.1f} | " + " | ".join(cells) + " |")
    return lines + [""]


def _domain_md(d: str, dom: dict, hook: str, figs: dict[str, str]) -> list[str]:
    out = [f"### {md_escape(d)} at `{hook}`", ""]
    for metric, m in dom["metrics"].items():
        out += [f"**{METRICS[metric]}** (mean ± std over seeds, interpolated at matched L0):", ""]
        out += _table_md(m["table"], metric)
        for diff in m.get("differences", []):
            if "unavailable" not in diff:
                out.append(f"- {md_escape(diff['a'])} − {md_escape(diff['b'])} at L0 {diff['l0']:.1f}: "
                           f"{diff['text']}")
        g = m.get("gap_finetuned") or {}
        if g.get("budgets"):
            out.append(f"- Gap closed by fine-tuning (at L0 {g['l0']:.1f}): " + "; ".join(
                f"{r['budget']:,}: {r['text']}" for r in g["budgets"]))
            sb = g.get("smallest_budget")
            if sb:
                out.append(f"- Smallest budget closing 50%: {sb['0.5']['text']}; 90%: {sb['0.9']['text']} "
                           f"(from the lower interval bound: {sb['0.5 (lower bound)']['text']}; "
                           f"{sb['0.9 (lower bound)']['text']}).")
            elif g.get("why_no_budget"):
                out.append(f"- No smallest budget: {g['why_no_budget']}.")
        r = m.get("residual") or {}
        if "stack" in r:
            ref = r.get(GENERAL, {})
            out.append(f"- Residual baseline (general + residual SAE, L0 {r['l0']:.1f}): {r['stack']['mean']:.3f} ± "
                       f"{r['stack']['std']:.3f}" + (f" vs general {ref['mean']:.3f} at the same L0" if "mean" in ref
                                                     else ""))
        forget = [f for f in m.get("forgetting", []) if "diff" in f]
        if forget:
            out.append("- Forgetting on general data (fine-tuned − general at matched L0): " + "; ".join(
                f"{f['budget']:,}: {f['text']}" for f in forget))
        out.append("")
    for name in (f"frontier_{hook}_{d}", f"gap_{hook}_{d}"):
        if name in figs:
            out += [f"![{name}]({figs[name]})", ""]
    return out


def _ladder(config: dict) -> str:
    """``standard SAEs, L1 ladder [...]`` or ``topk SAEs, k ladder [...]`` from a results.json config."""
    arch = config.get("architecture", "standard")
    if arch in ("topk", "batchtopk"):
        return f"{arch} SAEs, k ladder {config.get('k_ladder')} (every condition at the same k)"
    return f"{arch} SAEs, L1 ladder {config.get('l1_ladder')}"


def write_full_report(results: dict, out: Path) -> dict[str, Path]:
    """results.json, report.md and the figures in ``out``."""
    out = Path(out)
    figs: dict[str, str] = {}
    for hook, hres in results["hooks"].items():
        safe = hook.replace("/", "_")
        for d, dom in hres["domains"].items():
            figs[f"frontier_{hook}_{d}"] = frontier_figure(dom, d, hook, out / f"frontier_{safe}_{d}.png").name
            figs[f"gap_{hook}_{d}"] = gap_figure(dom, d, hook, out / f"gap_{safe}_{d}.png").name
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    lines = ["# The rigorous domain-SAE study", "", md_escape(results["question"]), "",
             f"Model `{results['model']}`; hooks {', '.join(f'`{h}`' for h in results['hooks'])}; seeds "
             f"{results['config']['seeds']}; {_ladder(results['config'])}; general mixture "
             f"{results['config']['general_mix']} (token shares of every batch); wall-clock of the run that "
             f"finished each hook: " + ", ".join(f"`{h}` {sum(r.get('timing_seconds', {}).values()) / 60:.1f} min"
                                                 for h, r in results["hooks"].items()) + ".", ""]
    for hook, hres in results["hooks"].items():
        lines += [f"## Hook `{hook}`", ""]
        for d, dom in hres["domains"].items():
            lines += _domain_md(d, dom, hook, figs)
        ov = hres.get("overlap") or {}
        if ov.get("pairs"):
            lines += ["**Dictionary overlap** (Hungarian matched fraction at cosine ≥ "
                      f"{ov['threshold']}; the other-seed pairs are the yardstick):", ""]
            lines += [f"- {md_escape(k)}: {v['matched_fraction']:.2f}" for k, v in ov["pairs"].items()
                      if v.get("matched_fraction") is not None]
            for d, rot in ov.get("rotation", {}).items():
                top = ", ".join(f"{r['latent']} ({r['angle_degrees']:.0f}°)" for r in rot["most_rotated"][:5])
                lines.append(f"- Decoder rotation general → general→{md_escape(d)}: mean cosine "
                             f"{rot['mean_cosine']:.3f}; most rotated latents: {top}")
            lines.append("")
        for d, pr in (hres.get("probing") or {}).items():
            lines += [f"**k-sparse probing, {md_escape(d)}** (balanced test accuracy; chance 0.5):", ""]
            for task, t in pr["tasks"].items():
                if "skipped" in t:
                    continue
                cells = [f"{md_escape(n)}: " + ", ".join(f"k={k} {v:.2f}" for k, v in s["accuracy"].items())
                         for n, s in t["saes"].items()]
                lines.append(f"- {md_escape(task)}: raw dense {t['raw_dense']:.2f}; " + "; ".join(cells))
            lines.append("")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return {"results_json": out / "results.json", "report_md": out / "report.md"}

