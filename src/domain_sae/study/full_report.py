"""Report of the rigorous study: results.json, report.md, a self-contained report.html and PNG figures (EV/CE-score
vs L0 frontiers per condition and seed; the gap-closed curve against fine-tuning tokens with seed bands, next to
token-matched scratch SAEs). The report opens with the answer per depth and domain, then the evidence; it is built
from the document blocks of :mod:`.document`, which render both formats and escape every piece of text."""

from __future__ import annotations

import json
from pathlib import Path
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .config import GENERAL, scratch_name  # noqa: E402
from .document import Block, Bullets, FigureRef, Heading, Paragraph, Table, render_html, render_markdown  # noqa: E402
from .full_analysis import METRICS  # noqa: E402
from .full_runs import budget_condition  # noqa: E402

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


def _table(table: dict) -> list[Block]:
    if "unavailable" in table:
        return [Paragraph(f"(no common L0 range: {table['unavailable']})")]
    conds = [k for k in table["by_l0"][0] if k != "l0"]
    rows = [[f"{row['l0']:.1f}"] + [f"{row[c]['mean']:.3f} ± {row[c]['std']:.3f}" for c in conds]
            for row in table["by_l0"]]
    return [Table(["L0"] + conds, rows)]


def _domain_blocks(d: str, dom: dict, hook: str, figs: dict[str, Path]) -> list[Block]:
    out: list[Block] = [Heading(f"{d} at {hook}", 3)]
    for metric, m in dom["metrics"].items():
        out.append(Paragraph(f"{METRICS[metric]} (mean ± std over seeds, at matched L0):", strong=True))
        out += _table(m["table"])
        items = [f"{diff['a']} − {diff['b']} at L0 {diff['l0']:.1f}: {diff['text']}"
                 for diff in m.get("differences", []) if "unavailable" not in diff]
        g = m.get("gap_finetuned") or {}
        if g.get("budgets"):
            items.append(f"Gap closed by fine-tuning (at L0 {g['l0']:.1f}): " + "; ".join(
                f"{r['budget']:,}: {r['text']}" for r in g["budgets"]))
            sb = g.get("smallest_budget")
            if sb:
                items.append(f"Smallest budget closing 50%: {sb['0.5']['text']}; 90%: {sb['0.9']['text']} (from the "
                             f"lower interval bound: {sb['0.5 (lower bound)']['text']}; "
                             f"{sb['0.9 (lower bound)']['text']}).")
            elif g.get("why_no_budget"):
                items.append(f"No smallest budget: {g['why_no_budget']}.")
        gs = m.get("gap_scratch") or {}
        if gs.get("budgets"):
            items.append("Token-matched scratch SAEs, same fraction: " + "; ".join(
                f"{r['budget']:,}: {r['text']}" for r in gs["budgets"]))
        r = m.get("residual") or {}
        if "stack" in r:
            ref = r.get(GENERAL, {})
            items.append(f"Residual baseline (general + residual SAE, L0 {r['l0']:.1f}): {r['stack']['mean']:.3f} ± "
                         f"{r['stack']['std']:.3f}" + (f" vs general {ref['mean']:.3f} at the same L0"
                                                       if "mean" in ref else ""))
        forget = [f for f in m.get("forgetting", []) if "diff" in f]
        if forget:
            items.append("Forgetting on general data (fine-tuned − general at matched L0): " + "; ".join(
                f"{f['budget']:,}: {f['text']}" for f in forget))
        if items:
            out.append(Bullets(items))
    out += [FigureRef(n) for n in (f"frontier_{hook}_{d}", f"gap_{hook}_{d}") if n in figs]
    return out


def _diff_of(m: dict, a: str, b: str) -> dict:
    return next((x for x in m.get("differences", []) if x.get("a") == a and x.get("b") == b), {})


def _metric_clause(d: str, m: dict, hb: int) -> str:
    """One metric's answer at one hook and domain: the two differences, the gap closed and the budgets."""
    sc, ft = _diff_of(m, scratch_name(d), GENERAL), _diff_of(m, budget_condition(d, hb), GENERAL)
    text = (f"at L0 {m['l0']:.0f}, scratch − general {sc.get('text', 'n/a')}, fine-tuned on {hb:,} tokens − "
            f"general {ft.get('text', 'n/a')}")
    g = m.get("gap_finetuned") or {}
    row = next((r for r in g.get("budgets", []) if r["budget"] == hb), None)
    if row is not None:
        text += f", gap closed at {hb:,} tokens: {row['text']}"
    sb = g.get("smallest_budget")
    if sb:
        text += f" (50% of the gap: {sb['0.5']['text']}; 90%: {sb['0.9']['text']})"
    forget = next((f for f in m.get("forgetting", []) if f.get("budget") == hb and "diff" in f), None)
    if forget:
        text += f", forgetting on general data {forget['text']}"
    return text


def answer_lines(results: dict) -> list[str]:
    """One line per hook and domain: the domain benefit, what fine-tuning recovers and at what budget, per metric."""
    out = []
    for hook, hres in results["hooks"].items():
        for d, dom in hres["domains"].items():
            hb = dom["headline_budget"]
            parts = [f"{METRICS[k]} {_metric_clause(d, m, hb)}" if m.get("l0") is not None else
                     f"{METRICS[k]}: the conditions share no L0 range" for k, m in dom["metrics"].items()]
            out.append(f"{hook}, {d}: " + "; ".join(parts) + ".")
    return out


def _ladder(config: dict) -> str:
    """``standard SAEs, L1 ladder [...]`` or ``topk SAEs, k ladder [...]`` from a results.json config."""
    arch = config.get("architecture", "standard")
    if arch in ("topk", "batchtopk"):
        return f"{arch} SAEs, k ladder {config.get('k_ladder')} (every condition at the same k)"
    return f"{arch} SAEs, L1 ladder {config.get('l1_ladder')}"


def _hook_extra_blocks(hres: dict) -> list[Block]:
    out: list[Block] = []
    ov = hres.get("overlap") or {}
    if ov.get("pairs"):
        out.append(Paragraph(f"Dictionary overlap (Hungarian matched fraction at cosine ≥ {ov['threshold']}; the "
                             "other-seed pairs are the yardstick):", strong=True))
        items = [f"{k}: {v['matched_fraction']:.2f}" for k, v in ov["pairs"].items()
                 if v.get("matched_fraction") is not None]
        for d, rot in ov.get("rotation", {}).items():
            top = ", ".join(f"{r['latent']} ({r['angle_degrees']:.0f}°)" for r in rot["most_rotated"][:5])
            items.append(f"Decoder rotation general → general→{d}: mean cosine {rot['mean_cosine']:.3f}; most "
                         f"rotated latents: {top}")
        out.append(Bullets(items))
    for d, pr in (hres.get("probing") or {}).items():
        out.append(Paragraph(f"k-sparse probing, {d} (balanced test accuracy; chance 0.5):", strong=True))
        items = []
        for task, t in pr["tasks"].items():
            if "skipped" in t:
                continue
            cells = [f"{n}: " + ", ".join(f"k={k} {v:.2f}" for k, v in sv["accuracy"].items())
                     for n, sv in t["saes"].items()]
            items.append(f"{task}: raw dense {t['raw_dense']:.2f}; " + "; ".join(cells))
        out.append(Bullets(items))
    return out


def report_blocks(results: dict, figs: dict[str, Path]) -> list[Block]:
    cfg = results["config"]
    timing = ", ".join(f"{h} {sum(r.get('timing_seconds', {}).values()) / 60:.1f} min"
                       for h, r in results["hooks"].items())
    blocks: list[Block] = [
        Heading("The rigorous domain-SAE study", 1), Paragraph(results["question"]),
        Paragraph(f"Model {results['model']}; hooks {', '.join(results['hooks'])}; seeds {cfg['seeds']}; "
                  f"{_ladder(cfg)}; general mixture {cfg['general_mix']} (token shares of every batch); general "
                  f"and scratch SAEs {cfg['general_tokens']:,} / {cfg['scratch_tokens']:,} tokens; fine-tuning "
                  f"budgets {cfg['budget_ladder']}; wall-clock of the run that finished each hook: {timing}."),
        Heading("Answer", 2),
        Paragraph("A difference is called only when it exceeds t × its standard error (seeds and held-out documents) "
                  "and the seed-to-seed spread; gap fractions carry a bootstrap interval over seeds."),
        Bullets(answer_lines(results))]
    for hook, hres in results["hooks"].items():
        blocks.append(Heading(f"Hook {hook}", 2))
        for d, dom in hres["domains"].items():
            blocks += _domain_blocks(d, dom, hook, figs)
        blocks += _hook_extra_blocks(hres)
    return blocks


def write_full_report(results: dict, out: Path) -> dict[str, Path]:
    """results.json, report.md, report.html and the figures in ``out``."""
    out = Path(out)
    figs: dict[str, Path] = {}
    for hook, hres in results["hooks"].items():
        safe = hook.replace("/", "_")
        for d, dom in hres["domains"].items():
            figs[f"frontier_{hook}_{d}"] = frontier_figure(dom, d, hook, out / f"frontier_{safe}_{d}.png")
            figs[f"gap_{hook}_{d}"] = gap_figure(dom, d, hook, out / f"gap_{safe}_{d}.png")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    blocks = report_blocks(results, figs)
    (out / "report.md").write_text(render_markdown(blocks, figs))
    (out / "report.html").write_text(render_html(blocks, figs, title="domain-sae: the rigorous study"))
    return {"results_json": out / "results.json", "report_md": out / "report.md", "report_html": out / "report.html"}
