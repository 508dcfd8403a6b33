"""The report's sections, in reading order, as document blocks (:mod:`.document`) built from the JSON-ready results
dict: the answer first, then the SAEs, the matrix, token efficiency and forgetting, dictionary overlap, direction
capture, steering, and the run (stages, timings, config, versions)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import GENERAL, scratch_name
from .document import Block, Bullets, Code, FigureRef, Heading, Paragraph, Table
from .findings import CES, EV, L0, fmt, matrix_spread, matrix_value, num, pct, recon_spread, recon_value

TITLE = "Domain-specific SAEs: does fine-tuning a general SAE match a domain SAE?"
MATRIX_TABLES = [(CES, "CE-loss score (1 = as good as the clean model, 0 = as bad as zero-ablation)", "{:.3f}"),
                 ("metrics/delta_loss", "Δ CE with the SAE spliced in (nats/token)", "{:+.3f}"),
                 ("metrics/kl_div_score", "KL score", "{:.3f}"), (EV, "explained variance", "{:.3f}"),
                 (L0, "L0 (active latents per token)", "{:.1f}"),
                 ("sparsity/dead_fraction", "dead fraction (never fired on the set)", "{:.3f}")]
MATRIX_FIGURES = ("heatmap_ce_loss_score", "heatmap_explained_variance", "heatmap_delta_loss", "heatmap_kl_div_score",
                  "heatmap_l0")
NEWLINE = "⏎"  # how a newline inside a text snippet (examples, generations) is shown


def _figures(figs: dict[str, Path], *names: str) -> list[Block]:
    return [FigureRef(k) for k in names if k in figs]


def answer_section(res: dict) -> list[Block]:
    cfg, model = res["config"], res["model"]
    return [Heading(TITLE, 1), Paragraph(res.get("question", "")), Heading("Answer"), Bullets(res["answer"]),
            Paragraph(f"Model {model['name']} at {model['hook']} (d_in {model.get('d_in')}, d_sae "
                      f"{model.get('d_sae')}). Domains: " + ", ".join(f"{d} = {cfg['domains'][d]}"
                                                                      for d in res["domains"])
                      + "; general = equal shares of every domain.")]


def saes_section(res: dict) -> list[Block]:
    return [Heading("SAEs"), Table(["SAE", "kind", "training tokens", "total tokens (incl. parent)", "seed"],
                                   [[n, s["kind"], f"{s['training_tokens']:,}", f"{s['total_tokens']:,}", s["seed"]]
                                    for n, s in res["saes"].items()])]


def _segment_tables(res: dict) -> list[Block]:
    """Per domain: EV / CE-loss score of every SAE on each segment kind (user, assistant, ...), when several."""
    out: list[Block] = []
    for d in res["domains"]:
        segs = (res["matrix"][GENERAL].get(d, {}) or {}).get("segments") or {}
        names = [n for n in segs if segs[n].get("tokens/reconstruction_counted", 1)]
        if len(names) <= 1:
            continue
        rows = []
        for s in res["matrix"]:
            per = res["matrix"][s][d].get("segments") or {}
            rows.append([s] + [f"{fmt((per.get(n) or {}).get(EV))} / {fmt((per.get(n) or {}).get(CES))}"
                               for n in names])
        out += [Paragraph(f"{d} held-out by segment (explained variance / CE-loss score)", strong=True),
                Table(["SAE"] + names, rows)]
    return out


def matrix_section(res: dict, figs: dict[str, Path]) -> list[Block]:
    sets, saes = [GENERAL, *res["domains"]], list(res["matrix"])
    out: list[Block] = [Heading("Matrix: every SAE on every held-out set")]
    es = res.get("data", {}).get("eval_sets", {})
    if es:
        out.append(Paragraph("Held-out tokens per eval set (special tokens excluded from the counts): " + "; ".join(
            f"{k}: {v['tokens']:,} tokens, {v['lm_counted']:,} next-token targets, "
            f"{v['reconstruction_counted']:,} reconstructed" for k, v in es.items()) + "."))
    for key, label, spec in MATRIX_TABLES:
        rows = [[s] + [fmt(res["matrix"][s].get(d, {}).get(key), spec) for d in sets] for s in saes]
        rows.append(["seed-to-seed spread"] + [fmt(matrix_spread(res, d, key), "{:.3f}") for d in sets])
        out += [Paragraph(label, strong=True), Table(["SAE"] + [f"{d} held-out" for d in sets], rows)]
    clean = [f"{d} {fmt(matrix_value(res, GENERAL, d, 'metrics/ce_loss_without_sae'))} / "
             f"{fmt(matrix_value(res, GENERAL, d, 'metrics/ce_loss_with_ablation'))}" for d in sets]
    out.append(Paragraph("CE without SAE / with zero-ablation (nats/token): " + ", ".join(clean) + "."))
    return out + _segment_tables(res) + _figures(figs, *MATRIX_FIGURES)


def efficiency_section(res: dict, figs: dict[str, Path]) -> list[Block]:
    cfg, data = res["config"], res.get("data", {})
    out: list[Block] = [Heading("Token efficiency and forgetting"), Paragraph(
        "Reconstruction on the held-out reconstruction sets (" + ", ".join(
            f"{k} {v:,}" for k, v in data.get("recon_tokens_counted", {}).items()) + " tokens). Fine-tuned budgets "
        f"count only the fine-tuning tokens; every fine-tuned SAE also carries the general SAE's "
        f"{cfg['general_tokens']:,} tokens.")]
    for d in res["domains"]:
        c = res["budgets"].get(d)
        if not c:
            continue
        rows = [[f"{t:,}", fmt(a.get("explained_variance")), fmt(b.get("explained_variance")),
                 fmt(a.get("l0"), "{:.1f}"), fmt(b.get("l0"), "{:.1f}"), fmt(g.get("explained_variance"))]
                for t, a, b, g in zip(c["tokens"], c["scratch"], c["finetuned"], c["finetuned_on_general"])]
        out += [Paragraph(f"{d} (general SAE EV {fmt(recon_value(res, GENERAL, d))}; {scratch_name(d)} at "
                          f"{cfg['scratch_tokens']:,} tokens {fmt(recon_value(res, scratch_name(d), d))}; "
                          f"seed-to-seed spread {fmt(recon_spread(res, d))})", strong=True),
                Table(["tokens", "EV scratch", "EV fine-tuned", "L0 scratch", "L0 fine-tuned",
                       "fine-tuned EV on general"], rows)]
    return out + _figures(figs, "token_efficiency", "forgetting")


def _example(e: dict) -> str:
    return f"{e.get('prefix', '')}[[{e.get('token', '')}]]{e.get('suffix', '')}".replace("\n", NEWLINE)


def overlap_section(res: dict, figs: dict[str, Path]) -> list[Block]:
    ov = res["overlap"]
    rows = [[k, fmt(p["max_cos_a_to_b"]["mean"]), fmt(p["max_cos_b_to_a"]["mean"]),
             fmt((p.get("hungarian") or {}).get("matched_fraction")),
             fmt((p.get("hungarian") or {}).get("mean_cosine"))] for k, p in ov["pairs"].items()]
    drift = [f"Drift {k}: mean cosine to the parent's decoder vector {fmt(v['mean'])} (median {fmt(v['median'])}); "
             f"{pct(num(v['frac_below_0.9']))} of latents below 0.9, {pct(num(v.get('frac_below_0.5')))} below 0.5."
             for k, v in ov["drift"].items()]
    items = []
    for d, v in ov["domain_specific"].items():
        items.append(f"General SAE latents that fire on {d} (density ≥ 1e-3) and never on the other domains: "
                     f"{v['count']}.")
        items += [f"latent {t['latent']} (density {t['density']:.4f}): "
                  + " | ".join(_example(e) for e in t["examples"][:3]) for t in v["top"]]
    return [Heading("Dictionary overlap"),
            Table(["pair", "mean max-cos (first → second)", "mean max-cos (second → first)",
                   f"matched one-to-one at ≥ {ov['threshold']}", "mean matched cosine"], rows),
            Bullets(drift), Bullets(items)] + _figures(figs, "matching", "max_cosine", "drift")


def directions_section(res: dict, figs: dict[str, Path]) -> list[Block]:
    dr = res["directions"]
    a, b = dr["labels"]
    rows = []
    for n, r in dr["per_sae"].items():
        at = {k: i for i, k in enumerate(r["ks"])}
        rows.append([n, fmt(r["reconstruction_cosine"]), fmt(r["best_latent_cosine"]), r["best_latent"],
                     *(fmt(r["topk_lstsq_rel_error"][at[k]]) if k in at else "n/a" for k in (1, 8, 64)),
                     *(fmt(r["omp_rel_error"][at[k]]) if k in at else "n/a" for k in (1, 8, 64))])
    return [Heading(f"Direction capture: {a} − {b}"),
            Paragraph(f"Difference of the mean hook activations of {dr['n_prompts'][0]} {a} prompts and "
                      f"{dr['n_prompts'][1]} {b} prompts (user tokens of the chat-rendered prompt). Examples: "
                      + "; ".join(repr(p) for p in dr["example_prompts"][0][:2]) + " vs "
                      + "; ".join(repr(p) for p in dr["example_prompts"][1][:2]) + "."),
            Table(["SAE", "reconstruction cosine", "best single-latent cosine", "latent", "top-k LS error k=1",
                   "k=8", "k=64", "OMP error k=1", "k=8", "k=64"], rows)] + _figures(figs, "direction_capture")


def _generation_tables(st: dict) -> list[Block]:
    """Per prompt: the greedy continuation with each direction added at each strength, side by side."""
    gens = st["add"].get("generations") or {}
    if not gens.get("clean"):
        return []
    strengths = [str(float(x)) for x in st["add"]["strengths"]]
    out: list[Block] = []
    for i, prompt in enumerate(st["prompts"]):
        rows = [["none (clean)"] + [gens["clean"][i].replace("\n", NEWLINE)] * len(strengths)]
        for n in st["add"]["ce_change"]:
            rows.append([n] + [gens[n][s][i].replace("\n", NEWLINE) if s in gens.get(n, {}) else "n/a"
                               for s in strengths])
        out += [Paragraph(f"Greedy continuations of the prompt {prompt!r}, side by side ({NEWLINE} = newline):"),
                Table(["direction added"] + [f"{rel}× norm" for rel in st["relative_strengths"]], rows)]
    return out


def steering_section(res: dict, figs: dict[str, Path]) -> list[Block]:
    st, doms = res["steering"], res["domains"]
    chosen = "; ".join(f"{n}: latent {c['latent']} (mean activation difference "
                       f"{fmt(c['mean_activation_difference'])})" for n, c in st["chosen"].items())
    intro = (f"Directions added at the hook as unit vectors times {st['relative_strengths']} × the mean activation "
             f"norm ({fmt(st['mean_activation_norm'], '{:.2f}')}): {st['domain']} latents with the largest "
             f"{st['domain']}-minus-other mean activation on held-out data ({chosen}), the difference-of-means "
             f"direction and a random direction of equal norm. ΔCE in nats/token on held-out text "
             f"({', '.join(f'{k} {v:,} tokens' for k, v in st.get('tokens', {}).items())}); clean CE: "
             + ", ".join(f"{k} {fmt(v)}" for k, v in st["add"]["clean_ce"].items()) + ".")
    added = [[n] + [" / ".join(fmt(v, "{:+.3f}") for v in per_dom[d]) for d in doms]
             for n, per_dom in st["add"]["ce_change"].items()]
    ablated = [[n] + [fmt(per_dom[d][0], "{:+.3f}") for d in doms] for n, per_dom in st["ablate"]["ce_change"].items()]
    return ([Heading("Steering"), Paragraph(intro),
             Table(["direction (added)"] + [f"ΔCE {d} at each strength" for d in doms], added),
             Table(["direction (projected out)"] + [f"ΔCE {d}" for d in doms], ablated)]
            + _figures(figs, "steering") + _generation_tables(st))


def run_section(res: dict) -> list[Block]:
    stages, est, data = res.get("stages", {}), res.get("estimate") or {}, res.get("data", {})
    rows: list[list[Any]] = [
        [k, f"{v.get('seconds', 0):.0f}", ", ".join(f"{n:,} {kind}" for kind, n in (v.get("tokens") or {}).items())
         or "-", v.get("what", "")] for k, v in stages.items()]
    rows.append(["total", f"{num(res.get('timing_seconds', {}).get('total')):.0f}", "", ""])
    out: list[Block] = [
        Heading("Run"),
        Paragraph("Wall-clock time of each stage and the tokens it processed (truncated = model run up to the hook; "
                  "full = full model forward; sae = SAE training tokens; generated = greedy steps)"
                  + (f"; estimate before the run: {est['minutes']} min ({est.get('rates', {}).get('source', '')})"
                     if est else "") + "."),
        Table(["stage", "seconds", "tokens", "what"], rows),
        Paragraph("Cached training tokens per domain: " + ", ".join(
            f"{k} {v:,}" for k, v in data.get("cache_tokens", {}).items()) + "."),
        Code(json.dumps(res["config"], indent=1))]
    store = res.get("feature_store")
    if store:
        out.append(Paragraph(f"Feature store of the SAEs above ({store['tokens_per_domain']:,} held-out tokens per "
                             f"domain): {store['path']} beside this report; browse it with `{store['command']}` "
                             f"(feature, prompt and comparison pages)."))
    if res.get("versions"):
        out.append(Paragraph("Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + "."))
    return out


def document(res: dict, figs: dict[str, Path]) -> list[Block]:
    """The whole report, in reading order."""
    return (answer_section(res) + saes_section(res) + matrix_section(res, figs) + efficiency_section(res, figs)
            + overlap_section(res, figs) + directions_section(res, figs) + steering_section(res, figs)
            + run_section(res))
