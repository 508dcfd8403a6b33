"""The report's sections, in reading order, as document blocks (:mod:`.document`) built from the JSON-ready results
dict: the answer (at most five sentences and one figure), the setup, per hook the findings per domain and the
analyses, every run's numbers, and the run (timings, estimate, config, versions)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .config import GENERAL, slug
from .document import Block, Bullets, Code, FigureRef, Heading, Paragraph, Table
from .figures import num
from .findings import METRICS, TESTS
from .scale_report import adaptation_blocks, convergence_blocks, literature_section, resolvable_items

TITLE = "Domain-specific SAEs: does fine-tuning a general SAE match a domain SAE?"
MATRIX_TABLES = [("metrics/ce_loss_score", "CE-loss score (1 = as good as the clean model, 0 = as bad as "
                  "zero-ablation)", "{:.3f}"), ("metrics/delta_loss", "Δ CE with the SAE spliced in (nats/token)",
                                                "{:+.3f}"),
                 ("metrics/kl_div_score", "KL score", "{:.3f}"), ("metrics/explained_variance", "explained variance",
                                                                  "{:.3f}"),
                 ("metrics/l0", "L0 (active latents per token)", "{:.1f}"),
                 ("sparsity/dead_fraction", "dead fraction (never fired on the set; a count, no interval)", "{:.3f}")]
NEWLINE = "⏎"  # how a newline inside a text snippet (examples, generations) is shown


def fmt(x: Any, spec: str = "{:.3f}") -> str:
    """``x`` formatted with ``spec``; ``n/a`` when missing or not finite."""
    v = num(x)
    return "n/a" if not math.isfinite(v) else spec.format(v)


def _figs(figs: dict[str, Path], *names: str) -> list[Block]:
    return [FigureRef(k) for k in names if k in figs]


def answer_section(res: dict, figs: dict[str, Path]) -> list[Block]:
    return [Heading(TITLE, 1), Paragraph(res["question"]), Heading("Answer"), Paragraph(" ".join(res["answer"]))] \
        + _figs(figs, "answer")


def setup_section(res: dict) -> list[Block]:
    cfg = res["config"]
    mix = cfg["general_mix"] or {d: 1 for d in cfg["domains"]}
    items = [f"Model {res['model']['name']}; hooks {', '.join(res['hooks'])}; {cfg['architecture']} SAEs, "
             f"expansion {cfg['expansion_factor']}, sparsity {cfg['sparsity']} (one run of every condition each).",
             "Domains: " + ", ".join(f"{d} = {s}" for d, s in cfg["domains"].items()) + "; general = token shares "
             + ", ".join(f"{k} {v}" for k, v in mix.items()) + " of every batch.",
             f"Conditions {', '.join(cfg['conditions'])}; seeds {cfg['seeds']}"
             + (f" and control seed {cfg['control_seed']} (general only)" if cfg["control_seed"] is not None else "")
             + (f"; general and scratch SAEs trained to the plateau (EV gain < 0.005 per doubling) or one pass over "
                f"their training split (checkpoints from {cfg['plateau_first_tokens']:,} tokens, at most "
                f"{cfg['plateau_max_tokens']:,})" if cfg.get("train_to_plateau") else
                f"; general / scratch SAEs {cfg['general_tokens']:,} / {cfg['scratch_tokens']:,} tokens")
             + f"; budgets {cfg['budgets']} (headline {cfg['headline_budget'] or max(cfg['budgets']):,}).",
             f"Held-out sets: explained variance on up to {cfg['recon_tokens']:,} tokens per corpus, model-pass "
             f"metrics on {cfg['eval_tokens']:,} tokens per set (errors: {cfg['n_bootstrap']} bootstrap replicates "
             f"over documents)."]
    for hook, h in res["hooks"].items():
        samp = h.get("sampling") or {}
        if samp:
            items.append(f"Held-out documents at {hook}: " + ", ".join(
                f"{c} {s.get('documents', '?')} of {s.get('heldout_documents', '?')}" for c, s in samp.items()) + ".")
        sets = h.get("sets") or {}
        if sets:
            items.append(f"Held-out sets at {hook} (tokens / documents): " + "; ".join(
                f"{s}: reconstruction {v['reconstruction']['tokens']:,} / {v['reconstruction']['documents']}, "
                f"model pass {v['model_pass']['tokens']:,} / {v['model_pass']['documents']}"
                for s, v in sets.items()) + ".")
    return [Heading("Setup"), Bullets(items)]


def _table(table: dict, first: str) -> list[Block]:
    if "unavailable" in table:
        return [Paragraph(f"(no common L0 range: {table['unavailable']})")]
    conds = [k for k in table["by_l0"][0] if k != "l0"]
    rows = [[f"{row['l0']:.1f}"] + [f"{row[c]['mean']:.3f} ± {row[c]['std']:.3f}" for c in conds]
            for row in table["by_l0"]]
    return [Table([first, *conds], rows)]


def _gap_items(m: dict) -> list[str]:
    items = []
    for kind, g in (m.get("gaps") or {}).items():
        if g.get("budgets"):
            items.append(f"Gap closed by {kind} ({g.get('label') or g['test']}): " + "; ".join(
                f"{r['budget']:,}: {r['text']}" for r in g["budgets"]))
        sb = g.get("smallest_budget")
        if sb:
            items.append(f"{kind}: smallest budget closing 50%: {sb['0.5']['text']}; 90%: {sb['0.9']['text']}.")
        elif g.get("why_no_budget"):
            items.append(f"{kind}: no smallest budget: {g['why_no_budget']}.")
    return items


def domain_blocks(d: str, dom: dict, hook: str, tag: str, figs: dict[str, Path]) -> list[Block]:
    out: list[Block] = [Heading(f"{d} at {hook}", 3)]
    for metric, m in dom["metrics"].items():
        out.append(Paragraph(f"{METRICS[metric]} (mean ± std over seeds):", strong=True))
        out += _table(m["table"], "L0" if dom["matched"] else "sparsity")
        items = [f"{x['a']} − {x['b']}: {x['text']} [{x.get('label') or x.get('test')}]"
                 for x in m.get("differences", []) if "unavailable" not in x]
        items += resolvable_items(m)
        items += _gap_items(m)
        r = m.get("residual") or {}
        if "stack" in r:
            items.append(f"Residual baseline (general + residual SAE, L0 {r['l0']:.1f}): {r['stack']['mean']:.3f} ± "
                         f"{r['stack']['std']:.3f} vs general {fmt((r.get(GENERAL) or {}).get('mean'))}.")
        for kind, rows in (m.get("forgetting") or {}).items():
            ok = [f for f in rows if "diff" in f]
            if ok:
                items.append(f"Forgetting on general data ({kind} − general): " + "; ".join(
                    f"{f['budget']:,}: {f['text']}" for f in ok))
        out.append(Bullets(items))
    return out + _figs(figs, f"frontier_{tag}_{d}", f"gap_{tag}_{d}")


def matrix_blocks(mat: dict, doms: list[str], hook: str, tag: str, figs: dict[str, Path]) -> list[Block]:
    sets = [GENERAL, *doms]
    out: list[Block] = [Heading(f"Every main SAE on every held-out set ({hook})", 3)]
    for key, label, spec in MATRIX_TABLES:
        rows = [[s] + [fmt(mat[s].get(d, {}).get(key), spec) for d in sets] for s in mat]
        out += [Paragraph(label, strong=True), Table(["SAE"] + [f"{d} held-out" for d in sets], rows)]
    clean = [f"{d} {fmt(mat[GENERAL].get(d, {}).get('metrics/ce_loss_without_sae'))} / "
             f"{fmt(mat[GENERAL].get(d, {}).get('metrics/ce_loss_with_ablation'))}" for d in sets]
    out.append(Paragraph("CE without SAE / with zero-ablation (nats/token): " + ", ".join(clean) + "."))
    for d in doms:
        segs = [n for n, v in (mat[GENERAL].get(d, {}).get("segments") or {}).items()
                if v.get("tokens/reconstruction_counted")]
        if len(segs) > 1:
            rows = [[s] + [f"{fmt(seg.get('metrics/explained_variance'))} / {fmt(seg.get('metrics/ce_loss_score'))}"
                           for seg in (mat[s].get(d, {}).get("segments", {}).get(n, {}) for n in segs)] for s in mat]
            out += [Paragraph(f"{d} held-out by segment (explained variance / CE-loss score)", strong=True),
                    Table(["SAE", *segs], rows)]
    return out + _figs(figs, *(f"heatmap_{k.split('/')[-1]}_{tag}" for k, *_ in MATRIX_TABLES))


def _example(e: dict) -> str:
    return f"{e.get('prefix', '')}[[{e.get('token', '')}]]{e.get('suffix', '')}".replace("\n", NEWLINE)


def overlap_blocks(ov: dict, tag: str, figs: dict[str, Path]) -> list[Block]:
    hung = {k: p.get("hungarian") or {} for k, p in ov["pairs"].items()}
    rows = [[k, fmt(p["max_cos_a_to_b"]["mean"]), fmt(p["max_cos_b_to_a"]["mean"]),
             fmt(hung[k].get("matched_fraction")), fmt(hung[k].get("mean_cosine"))] for k, p in ov["pairs"].items()]
    items = [f"Drift {k}: mean cosine to the parent's decoder vector {fmt(v['mean'])} (median {fmt(v['median'])}); "
             f"{fmt(100 * num(v['frac_below_0.9']), '{:.0f}')}% of latents below 0.9; most rotated: " + ", ".join(
                 f"{r['latent']} ({r['angle_degrees']:.0f}°)" for r in v["most_rotated"][:5]) + "."
             for k, v in ov["drift"].items()]
    for d, v in ov["domain_specific"].items():
        items.append(f"General SAE latents that fire on {d} (density ≥ 1e-3) and never on the other domains: "
                     f"{v['count']}.")
        items += [f"latent {t['latent']} (density {t['density']:.4f}): " + " | ".join(_example(e)
                                                                                      for e in t["examples"][:3])
                  for t in v["top"]]
    return [Heading("Dictionary overlap", 3),
            Table(["pair", "mean max-cos (first → second)", "mean max-cos (second → first)",
                   f"matched one-to-one at ≥ {ov['threshold']}", "mean matched cosine"], rows),
            Bullets(items)] + _figs(figs, f"matching_{tag}", f"drift_{tag}")


def probing_blocks(pr: dict) -> list[Block]:
    out: list[Block] = [Heading("k-sparse probing", 3)]
    for d, p in pr.items():
        items = []
        for task, t in p["tasks"].items():
            if "skipped" not in t:
                items.append(f"{task}: raw dense {t['raw_dense']:.2f}; " + "; ".join(
                    f"{n}: " + ", ".join(f"k={k} {v:.2f}" for k, v in sv["accuracy"].items())
                    for n, sv in t["saes"].items()))
        out += [Paragraph(f"{d} ({p['labels']} labels; balanced test accuracy, chance 0.5):", strong=True),
                Bullets(items)]
    return out


def directions_blocks(dr: dict, tag: str, figs: dict[str, Path]) -> list[Block]:
    a, b = dr["labels"]
    rows = []
    for n, r in dr["per_sae"].items():
        at = {k: i for i, k in enumerate(r["ks"])}
        rows.append([n, fmt(r["reconstruction_cosine"]), fmt(r["best_latent_cosine"]), r["best_latent"],
                     *(fmt(r[key][at[k]]) if k in at else "n/a" for key in ("topk_lstsq_rel_error", "omp_rel_error")
                       for k in (1, 8, 64))])
    return [Heading(f"Direction capture: {a} − {b}", 3),
            Paragraph(f"Difference of the mean hook activations of {dr['n_prompts'][0]} {a} prompts and "
                      f"{dr['n_prompts'][1]} {b} prompts (user tokens of the chat-rendered prompt). Examples: "
                      + "; ".join(repr(p) for p in dr["example_prompts"][0][:2]) + " vs "
                      + "; ".join(repr(p) for p in dr["example_prompts"][1][:2]) + "."),
            Table(["SAE", "reconstruction cosine", "best single-latent cosine", "latent", "top-k LS error k=1",
                   "k=8", "k=64", "OMP error k=1", "k=8", "k=64"], rows)] + _figs(figs, f"direction_capture_{tag}")


def steering_blocks(st: dict, doms: list[str], tag: str, figs: dict[str, Path]) -> list[Block]:
    if "unavailable" in st:
        return [Heading("Steering", 3), Paragraph(st["unavailable"])]
    chosen = "; ".join(f"{n}: latent {c['latent']} (mean activation difference {fmt(c['mean_activation_difference'])})"
                       for n, c in st["chosen"].items())
    intro = (f"Directions added at the hook as unit vectors times {st['relative_strengths']} × the mean activation "
             f"norm ({fmt(st['mean_activation_norm'], '{:.2f}')}): {st['domain']} latents with the largest "
             f"{st['domain']}-minus-other mean activation on held-out data ({chosen}), the difference-of-means "
             f"direction and a random direction of equal norm. ΔCE in nats/token on held-out text ("
             + ", ".join(f"{k} {v:,} tokens" for k, v in st["tokens"].items()) + "); clean CE: "
             + ", ".join(f"{k} {fmt(v)}" for k, v in st["add"]["clean_ce"].items()) + ".")
    added = [[n] + [" / ".join(fmt(v, "{:+.3f}") for v in per[d]) for d in doms] for n, per in
             st["add"]["ce_change"].items()]
    ablated = [[n] + [fmt(per[d][0], "{:+.3f}") for d in doms] for n, per in st["ablate"]["ce_change"].items()]
    out = [Heading("Steering", 3), Paragraph(intro),
           Table(["direction (added)"] + [f"ΔCE {d} at each strength" for d in doms], added),
           Table(["direction (projected out)"] + [f"ΔCE {d}" for d in doms], ablated)] + _figs(figs, f"steering_{tag}")
    gens = st["add"].get("generations") or {}
    strengths = [str(float(x)) for x in st["add"]["strengths"]]
    for i, prompt in enumerate(st["prompts"] if gens.get("clean") else []):
        rows = [["none (clean)"] + [gens["clean"][i].replace("\n", NEWLINE)] * len(strengths)]
        rows += [[n] + [gens[n][s][i].replace("\n", NEWLINE) if s in gens.get(n, {}) else "n/a" for s in strengths]
                 for n in st["add"]["ce_change"]]
        out += [Paragraph(f"Greedy continuations of the prompt {prompt!r}, side by side ({NEWLINE} = newline):"),
                Table(["direction added"] + [f"{rel}× norm" for rel in st["relative_strengths"]], rows)]
    return out


def runs_section(res: dict) -> list[Block]:
    """Every run's reconstruction and CE-loss score on its own set, per hook."""
    out: list[Block] = [Heading("Every run")]
    for hook, h in res["hooks"].items():
        rows = []
        for rid, m in h["measurements"].items():
            run = res["runs"][rid]
            own = run["domain"] or GENERAL
            r, lm = m["recon"].get(own, {}), (m["lm"].get(own) or {}).get("metrics", {})
            tokens = (h.get("training", {}).get(rid) or {}).get("tokens") or run["tokens"]  # trained, else planned
            rows.append([run["condition"], run["seed"], f"{run['sparsity']:g}", f"{tokens:,}", own,
                         fmt(r.get("ev")), fmt(r.get("l0"), "{:.1f}"), fmt(lm.get("metrics/ce_loss_score"))])
        out += [Paragraph(f"At {hook} (explained variance and L0 on the reconstruction set, CE-loss score on the "
                          f"model-pass set):", strong=True),
                Table(["condition", "seed", "sparsity", "tokens", "set", "EV", "L0", "CE-loss score"], rows)]
    return out


def run_section(res: dict) -> list[Block]:
    est = res.get("estimate") or {}
    rows = [[h, *(f"{v:.0f}" for v in hr.get("seconds", {}).values())] for h, hr in res["hooks"].items()]
    return [Heading("Run"),
            Paragraph(f"Wall-clock {fmt(res['timing_seconds'].get('total'), '{:.0f}')} s for this invocation (a "
                      f"resumed study reuses what earlier invocations finished); estimate before the run: "
                      f"{est.get('minutes')} min ({est.get('rates')}). Tests: " + "; ".join(
                          f"{k}: {v}" for k, v in TESTS.items()) + "."),
            Table(["hook", "train + reconstruction (s)", "model-pass metrics (s)", "analyses (s)"], rows),
            Code(json.dumps(res["config"], indent=1)),
            Paragraph("Versions: " + ", ".join(f"{k} {v}" for k, v in res.get("versions", {}).items()) + ".")]


def document(res: dict, figs: dict[str, Path]) -> list[Block]:
    """The whole report, in reading order."""
    doms = list(res["config"]["domains"])
    out = answer_section(res, figs) + setup_section(res)
    for hook, h in res["hooks"].items():
        tag, a = slug(hook), h["analyses"]
        out.append(Heading(f"Hook {hook}"))
        out += convergence_blocks(a["convergence"], hook, tag, figs) if a.get("convergence") else []
        kl = res["config"].get("kl_budgets") or res["config"]["budgets"]
        for d, dom in h["findings"].items():
            out += domain_blocks(d, dom, hook, tag, figs)
            out += adaptation_blocks(d, dom, hook, kl)
        out += matrix_blocks(a["matrix"], doms, hook, tag, figs) if a.get("matrix") else []
        out += overlap_blocks(a["overlap"], tag, figs) if a.get("overlap") else []
        out += probing_blocks(a["probing"]) if a.get("probing") else []
        out += directions_blocks(a["directions"], tag, figs) if a.get("directions") else []
        out += steering_blocks(a["steering"], doms, tag, figs) if a.get("steering") else []
        if a.get("features"):
            f = a["features"]
            out.append(Paragraph(f"Feature store of the main SAEs ({f['tokens_per_domain']:,} held-out tokens per "
                                 f"domain): {f['path']}; browse it with `{f['command']}`."))
    lit = literature_section(res) if "finetune" in res["config"]["conditions"] else []
    return out + lit + runs_section(res) + run_section(res)
