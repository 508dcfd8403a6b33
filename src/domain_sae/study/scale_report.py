"""The report's sections on whether the study's answer holds at scale, as document blocks (:mod:`.document`) from the
JSON-ready results: are the reference SAEs trained (held-out EV against tokens, final slope and stop, seed-to-seed
overlap against converged SAEs), the two ways to adapt side by side (MSE and end-to-end KL fine-tuning), and the
measured fractions next to the literature's, in the same units:

- Kissane et al. 2024: fine-tuning on about 5M chat tokens closed 54% (Mistral-7B) and 89% (Qwen1.5-0.5B) of the
  explained-variance gap to an 800M-token chat SAE trained from scratch: our ``ev`` gap closed, (EV_F - EV_G) /
  (EV_S - EV_G);
- Karvonen et al. 2025: KL (+ MSE) fine-tuning over an SAE's last ~25M tokens closes 20-50% of its CE-loss gap:
  the share of the general SAE's CE degradation recovered, (CE_G - CE_F) / (CE_G - CE_clean) (:mod:`.verdicts`).
"""

from __future__ import annotations

from typing import Any

from .config import GENERAL
from .document import Block, Bullets, FigureRef, Heading, Paragraph, Table
from .figures import num, tokens_label
from .findings import condition

KISSANE = ("Kissane et al. 2024 fine-tuned a base-model SAE on about 5M chat tokens and closed 54% (Mistral-7B) and "
           "89% (Qwen1.5-0.5B) of the explained-variance gap to a chat SAE trained from scratch on 800M tokens (under "
           "1% of its tokens); the CE score barely moved.")
KARVONEN = ("Karvonen et al. 2025 continued an SAE's training for its last ~25M tokens on KL(p_clean ‖ p_SAE) + MSE "
            "and closed 20-50% of its CE-loss gap (the CE increase the spliced-in SAE causes).")
STOPS = {"plateau": "plateau (EV gain < 0.005 per doubling)", "one_pass": "one pass over the training split",
         "max_tokens": "the token cap (plateau_max_tokens)", None: "not stopped"}


def _f(x: Any, spec: str = "{:.4f}") -> str:
    v = num(x)
    return "n/a" if v != v or v in (float("inf"), float("-inf")) else spec.format(v)


def convergence_blocks(conv: dict, hook: str, tag: str, figs: dict) -> list[Block]:
    """EV-vs-tokens table (final EV, slope, stop) of each reference SAE and the seed-to-seed overlap."""
    rows = []
    for rid, c in conv.get("curves", {}).items():
        curve, stop = c.get("curve") or [], c.get("stop") or {}
        rows.append([c["condition"], c["seed"], f"{c['tokens']:,}" if c.get("tokens") else "n/a",
                     _f(curve[-1]["ev"]) if curve else "n/a", _f(stop.get("slope_per_doubling"), "{:+.4f}"),
                     STOPS.get(stop.get("reason"), str(stop.get("reason")))])
    out: list[Block] = [Heading(f"Are the reference SAEs trained? ({hook})", 3)]
    if rows:
        out += [Paragraph("Each general and scratch SAE's held-out explained variance on its own set at checkpoints "
                          "spaced by doublings of tokens; the slope is the least-squares EV gain per doubling over "
                          "the last doubling (plateaued below 0.005)."),
                Table(["SAE", "seed", "tokens trained", "final held-out EV", "final slope per doubling", "stopped by"],
                      rows)]
    items = [f"{label} (seeds {', '.join(map(str, ov['seeds']))}): {ov['text']}."
             for label, ov in conv.get("seed_overlap", {}).items()]
    if items:
        out += [Paragraph(f"Seed-to-seed dictionary overlap at the end (sparsity {conv['sparsity']:g}; Hungarian "
                          f"matching of decoder directions):", strong=True), Bullets(items)]
    return out + ([FigureRef(f"plateau_{tag}")] if f"plateau_{tag}" in figs else [])


def _diff(m: dict, a: str, b: str) -> dict:
    return next((x for x in m.get("differences", []) if x.get("a") == a and x.get("b") == b), {})


def _gap_row(m: dict, kind: str, b: int) -> dict:
    return next((r for r in (m.get("gaps", {}).get(kind) or {}).get("budgets", []) if r["budget"] == b), {})


def _recovered(m: dict, kind: str, b: int) -> dict:
    return next((r for r in ((m.get("recovered") or {}).get(kind) or {}).get("rows", []) if r["budget"] == b), {})


def _mean(values: Any) -> str:
    v = [num(x) for x in values or []]
    return _f(sum(v) / len(v)) if v else "n/a"


def adaptation_blocks(d: str, dom: dict, hook: str, kl_budgets: list[int]) -> list[Block]:
    """MSE and end-to-end (KL) fine-tuning side by side per budget, on EV and CE-loss score."""
    out: list[Block] = []
    for metric, m in dom["metrics"].items():
        if "finetune_kl" not in (m.get("gaps") or {}):
            continue
        rows = []
        for b in kl_budgets:
            mse, kl = condition("finetune", d, b), condition("finetune_kl", d, b)
            gm, gk = _gap_row(m, "finetune", b), _gap_row(m, "finetune_kl", b)
            x = _diff(m, kl, mse)
            row = [f"{b:,}", _mean(gm.get("values")), _mean(gk.get("values")), x.get("text", "n/a"),
                   gm.get("text", "n/a"), gk.get("text", "n/a")]
            if metric == "ce":
                row += [_recovered(m, "finetune", b).get("text", "n/a"), _recovered(m, "finetune_kl", b).get(
                    "text", "n/a")]
            rows.append(row)
        head = ["budget (tokens)", "MSE fine-tune", "KL fine-tune", "KL − MSE (paired)", "gap closed, MSE",
                "gap closed, KL"]
        head += ["CE degradation recovered, MSE", "CE degradation recovered, KL"] if metric == "ce" else []
        name = {"ev": "explained variance", "ce": "CE-loss score"}[metric]
        out += [Paragraph(f"{d} at {hook}: MSE vs end-to-end (KL) fine-tuning of the general SAE, {name} (mean "
                          f"over seeds):", strong=True), Table(head, rows)]
    return out


def literature_section(res: dict) -> list[Block]:
    """The measured fractions next to Kissane et al. 2024 and Karvonen et al. 2025, and how this setting differs."""
    cfg = res["config"]
    rows = []
    for hook, h in res["hooks"].items():
        for d, dom in h["findings"].items():
            ev, ce = dom["metrics"].get("ev", {}), dom["metrics"].get("ce", {})
            for kind in ("finetune", "finetune_kl"):
                budgets = [r["budget"] for r in (ev.get("gaps", {}).get(kind) or {}).get("budgets", [])]
                if not budgets:
                    continue
                b = max(budgets)
                rows.append([hook, d, kind, tokens_label(b), _gap_row(ev, kind, b).get("text", "n/a"),
                             _gap_row(ce, kind, b).get("text", "n/a"), _recovered(ce, kind, b).get("text", "n/a")])
    scratch = [v["tokens"] for h in res["hooks"].values() for v in (h.get("training") or {}).values()
               if v.get("kind") == "scratch" and v.get("tokens")]
    ref = (f"{tokens_label(min(scratch))}-{tokens_label(max(scratch))} tokens (trained to the plateau or one pass)"
           if scratch else f"{tokens_label(cfg['scratch_tokens'])} tokens")
    d_in = {h: v.get("d_in") for h, v in res["hooks"].items()}
    width = ", ".join(f"{cfg['d_sae'] or cfg['expansion_factor'] * (n or 0):,} latents at {h}" for h, n in d_in.items())
    size = " (135M parameters)" if "135m" in str(res["model"]["name"]).lower() else ""
    differs = [f"Model: {res['model']['name']}{size} against Mistral-7B and Qwen1.5-0.5B.",
               f"Reference: our scratch SAEs saw {ref}, limited by the offline corpora (a few million tokens each); "
               f"Kissane's chat SAE saw 800M. A reference that is itself less trained makes the gap smaller and a "
               f"given fraction easier to close.",
               f"Budgets: at most {tokens_label(max(cfg['budgets']))} fine-tuning tokens here against about 5M "
               f"(Kissane) and ~25M (Karvonen, on larger models and SAEs).",
               f"Width: {width} ({cfg['architecture']}, sparsity {cfg['sparsity']}); the papers' widths are not "
               f"restated here (see their text).",
               "Units: our 'gap closed' is Kissane's unit (the general-to-scratch gap in explained variance; also "
               "shown for the CE-loss score); 'CE degradation recovered' is Karvonen's (the part of the CE increase "
               "of the general SAE that fine-tuning removes)."]
    return [Heading("Beside the literature"), Paragraph(KISSANE), Paragraph(KARVONEN),
            Table(["hook", "domain", "fine-tune", "budget", "EV gap closed (Kissane's unit)", "CE-score gap closed",
                   "CE degradation recovered (Karvonen's unit)"], rows),
            Paragraph("Where this setting differs:", strong=True), Bullets(differs)]


def resolvable_items(m: dict) -> list[str]:
    """The smallest difference the paired comparisons of one domain and metric resolve."""
    r = m.get("resolvable")
    if not r:
        return []
    first = (f"scratch − {GENERAL} ±{_f(r['scratch_minus_general'])}; "
             if r.get("scratch_minus_general") is not None else "")
    return [f"Smallest resolvable difference (half-width of the paired 95% interval): {first}over the "
            f"{r['n']} paired comparisons ±{_f(r['min'])} to ±{_f(r['max'])}."]
