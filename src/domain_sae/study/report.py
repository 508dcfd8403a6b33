"""results.json, report.md and a self-contained report.html (PNG plots embedded as base64, also written alongside)
for the domain-adaptation study.

The report opens with the answer in sentences. The yardstick for "a real difference" is the seed-to-seed spread:
for a metric m on an eval set, ``spread = |m(general) - m(general, other seed)|`` (the two general SAEs differ only
in their seed), floored at :data:`MIN_SPREAD`. A difference counts when it exceeds ``2 * spread``; otherwise the
report says there is no measurable difference. One pair of seeds is a rough yardstick, and the report says so.

The renderer only reads the JSON-ready results dict (what results.json holds), so a report can be re-rendered from
a results.json with :func:`render_from_json`. results.json (``schema_version`` 1) holds:

- ``config`` (the StudyConfig), ``domains``, ``model`` {name, hook, source, d_in, d_sae}, ``versions``;
- ``saes``: name -> {kind, domain, training_tokens, parent_tokens, total_tokens, seed, lineage};
- ``data``: cache_tokens per domain, held-out sequences, recon_tokens_counted, eval_sets {tokens, lm_counted, ...};
- ``matrix``: SAE -> eval set -> SPEC 3 metrics (CE/KL with the model + reconstruction) and ``segments``;
- ``recon``: SAE -> set -> {explained_variance, mse, cossim, l0, dead_fraction, relative_reconstruction_bias} on the
  larger reconstruction sets; ``budgets``: domain -> {tokens, scratch, finetuned, finetuned_on_general} (one recon
  dict per budget);
- ``overlap``: threshold, pairs ("A vs B" -> max_cos_a_to_b / max_cos_b_to_a histograms, hungarian), drift,
  domain_specific (count, top latents with example contexts);
- ``directions``: labels, n_prompts, example_prompts, per_sae (analysis.directions.direction_capture);
- ``steering``: domain, chosen latents, add / ablate (analysis.steering.steering_sweep), prompts, tokens;
- ``stages`` (seconds, tokens per kind, what), ``timing_seconds``, ``estimate``, ``answer`` (the sentences).
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any, Optional

from ..evaluation.report import jsonable, plot_heatmap
from .config import CONTROL, GENERAL, finetuned_name, scratch_name

CES, EV, L0 = "metrics/ce_loss_score", "metrics/explained_variance", "metrics/l0"
MIN_SPREAD = 0.002
FACTOR = 2.0  # a difference is real when it exceeds FACTOR x the seed-to-seed spread

REQUIRED_KEYS = ("config", "domains", "model", "saes", "matrix", "recon", "budgets", "overlap", "directions",
                 "steering", "stages")


class ReportError(ValueError):
    """The results dict lacks what the report needs (e.g. a results.json from another tool or an older schema)."""


# ----------------------------------------------------------------------------------------------------------------
# Numbers and comparisons

def num(x: Any) -> float:
    """float, with None (a NaN in results.json) as NaN."""
    return math.nan if x is None else float(x)


def f3(x: Any, spec: str = "{:.3f}") -> str:
    v = num(x)
    return "n/a" if not math.isfinite(v) else spec.format(v)


def spread(a: Any, b: Any, floor: float = MIN_SPREAD) -> float:
    """|a - b| floored at ``floor`` (NaN-safe: NaN when either value is missing)."""
    d = abs(num(a) - num(b))
    return max(d, floor) if math.isfinite(d) else math.nan


def verdict(delta: float, yard: float, higher: str = "higher", lower: str = "lower") -> str:
    """``higher``/``lower`` when |delta| > FACTOR * yard, else ``same`` (no measurable difference); ``unknown`` when
    a number is missing."""
    if not (math.isfinite(delta) and math.isfinite(yard)):
        return "unknown"
    if delta > FACTOR * yard:
        return higher
    if delta < -FACTOR * yard:
        return lower
    return "same"


def _cmp_text(delta: float, yard: float) -> str:
    v = verdict(delta, yard)
    if v == "unknown":
        return "cannot be compared (a value is missing)"
    rel = "more" if v != "same" else "less"
    tail = "" if v != "same" else ": no measurable difference"
    return f"Δ {delta:+.3f}, {rel} than {FACTOR:g}× the seed-to-seed spread of {yard:.3f}{tail}"


def _m(res: dict, sae: str, ds: str, key: str) -> float:
    return num(res["matrix"].get(sae, {}).get(ds, {}).get(key))


def _r(res: dict, sae: str, ds: str, key: str = "explained_variance") -> float:
    return num(res["recon"].get(sae, {}).get(ds, {}).get(key))


def matrix_spread(res: dict, ds: str, key: str) -> float:
    return spread(_m(res, GENERAL, ds, key), _m(res, CONTROL, ds, key))


def recon_spread(res: dict, ds: str, key: str = "explained_variance") -> float:
    return spread(_r(res, GENERAL, ds, key), _r(res, CONTROL, ds, key))


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%" if math.isfinite(x) else "n/a"


# ----------------------------------------------------------------------------------------------------------------
# The answer

def domain_findings(res: dict, d: str) -> dict[str, Any]:
    """The numbers behind the answer for domain ``d`` (CE-loss score is the primary metric; EV secondary)."""
    g, s, f = GENERAL, scratch_name(d), finetuned_name(d)
    out: dict[str, Any] = {"domain": d}
    for key, short in ((CES, "ce"), (EV, "ev"), (L0, "l0")):
        out[short] = {n: _m(res, name, d, key) for n, name in (("general", g), ("scratch", s), ("finetuned", f))}
        out[short]["spread"] = matrix_spread(res, d, key)
        out[short]["general_on_general"] = _m(res, g, GENERAL, key)
        out[short]["finetuned_on_general"] = _m(res, f, GENERAL, key)
        out[short]["spread_general"] = matrix_spread(res, GENERAL, key)
    ce = out["ce"]
    out["benefit"] = verdict(ce["scratch"] - ce["general"], ce["spread"], "yes", "negative")
    out["ft_vs_scratch"] = verdict(ce["finetuned"] - ce["scratch"], ce["spread"], "better", "worse")
    out["ft_vs_general"] = verdict(ce["finetuned"] - ce["general"], ce["spread"], "better", "worse")
    gain = ce["scratch"] - ce["general"]
    out["recovered"] = (ce["finetuned"] - ce["general"]) / gain if out["benefit"] == "yes" else math.nan
    out["forgetting"] = verdict(ce["finetuned_on_general"] - ce["general_on_general"], ce["spread_general"],
                                "improves", "forgets")
    # token-efficiency curve (reconstruction EV on the larger held-out reconstruction set)
    c = res["budgets"].get(d)
    if c:
        yard = recon_spread(res, d)
        full = _r(res, s, d)
        ft = [num(p.get("explained_variance")) for p in c["finetuned"]]
        sc = [num(p.get("explained_variance")) for p in c["scratch"]]
        out["curve"] = {
            "spread": yard, "scratch_full": full,
            "ft_wins": sum(verdict(a - b, yard) == "higher" for a, b in zip(ft, sc)),
            "scratch_wins": sum(verdict(a - b, yard) == "lower" for a, b in zip(ft, sc)),
            "n": len(c["tokens"]),
            "ft_reaches_full_at": next((t for t, v in zip(c["tokens"], ft) if verdict(v - full, yard) != "lower"
                                        and math.isfinite(v)), None),
            "scratch_reaches_full_at": next((t for t, v in zip(c["tokens"], sc)
                                             if verdict(v - full, yard) != "lower" and math.isfinite(v)), None)}
    return out


def answer(res: dict) -> list[str]:
    """The answer to the study's question, in sentences backed by the numbers (first sentence: the bottom line)."""
    cfg = res["config"]
    n = len(res["domains"])
    ft_tok, sc_tok, gen_tok = cfg["finetune_tokens"], cfg["scratch_tokens"], cfg["general_tokens"]
    share = ft_tok / sc_tok
    bottom, detail = [], []
    for d in res["domains"]:
        fd = domain_findings(res, d)
        ce, ev, l0 = fd["ce"], fd["ev"], fd["l0"]
        if fd["benefit"] == "unknown":
            bottom.append(f"on {d}, the comparison is incomplete (missing numbers)")
        elif fd["benefit"] != "yes":
            extra = (f", although the fine-tuned SAE beats the general one (CE-loss score "
                     f"{ce['finetuned'] - ce['general']:+.3f})" if fd["ft_vs_general"] == "better" else "")
            bottom.append(f"on {d}, there is no domain benefit to recover at this budget (the {d} SAE trained from "
                          f"scratch does not beat the general SAE beyond the seed-to-seed spread){extra}")
        elif fd["ft_vs_scratch"] in ("same", "better"):
            bottom.append(f"on {d}, yes: fine-tuning on {ft_tok:,} tokens ({share:.0%} of the scratch budget) "
                          f"matches{' or beats' if fd['ft_vs_scratch'] == 'better' else ''} the {d} SAE trained "
                          f"from scratch")
        else:
            bottom.append(f"on {d}, not at this budget: fine-tuning on {ft_tok:,} tokens recovers "
                          f"{_pct(fd['recovered'])} of the scratch SAE's advantage")
        detail.append(
            f"On held-out {d}, the {d} SAE trained from scratch ({sc_tok:,} tokens) has CE-loss score "
            f"{f3(ce['scratch'])} vs {f3(ce['general'])} for the general SAE ({gen_tok:,} tokens, 1/{n} {d}) "
            f"({_cmp_text(ce['scratch'] - ce['general'], ce['spread'])}); explained variance {f3(ev['scratch'])} vs "
            f"{f3(ev['general'])} ({_cmp_text(ev['scratch'] - ev['general'], ev['spread'])}), at L0 "
            f"{f3(l0['scratch'], '{:.1f}')} vs {f3(l0['general'], '{:.1f}')}.")
        detail.append(
            f"The general SAE fine-tuned on {ft_tok:,} {d} tokens reaches CE-loss score {f3(ce['finetuned'])} "
            f"(vs scratch: {_cmp_text(ce['finetuned'] - ce['scratch'], ce['spread'])}; vs general: "
            f"{_cmp_text(ce['finetuned'] - ce['general'], ce['spread'])}) and explained variance "
            f"{f3(ev['finetuned'])} at L0 {f3(l0['finetuned'], '{:.1f}')}"
            + (f"; it recovers {_pct(fd['recovered'])} of the scratch SAE's CE-score gain over the general SAE."
               if math.isfinite(fd["recovered"]) else "."))
        cur = fd.get("curve")
        if cur:
            top = max(res["budgets"][d]["tokens"])
            reach = (f"the fine-tuned SAE reaches the full scratch SAE's EV ({f3(cur['scratch_full'])}, within the "
                     f"spread) from {cur['ft_reaches_full_at']:,} tokens" if cur["ft_reaches_full_at"] is not None
                     else f"no fine-tuning budget up to {top:,} tokens reaches the full scratch SAE's EV "
                          f"({f3(cur['scratch_full'])}) within the spread")
            reach_s = (f", the scratch ladder from {cur['scratch_reaches_full_at']:,}"
                       if cur["scratch_reaches_full_at"] is not None else f", the scratch ladder (up to {top:,}) "
                                                                         f"does not")
            l0s = {k: [num(p.get("l0")) for p in res["budgets"][d][k]] for k in ("scratch", "finetuned")}
            detail.append(
                f"Token efficiency on {d} (explained variance on the larger held-out reconstruction set, spread "
                f"{f3(cur['spread'])}): at equal budgets the "
                f"fine-tuned SAE is ahead at {cur['ft_wins']} of {cur['n']} budgets and behind at "
                f"{cur['scratch_wins']}; {reach}{reach_s} (fine-tuned budgets exclude the general SAE's own "
                f"{gen_tok:,} tokens). L0 along the ladder: scratch "
                + " → ".join(f3(v, "{:.0f}") for v in l0s["scratch"]) + ", fine-tuned "
                + " → ".join(f3(v, "{:.0f}") for v in l0s["finetuned"])
                + " (EV at a higher L0 is cheaper: compare with the sparsity in mind).")
        fg = {"forgets": "it forgets", "improves": "it even improves", "same": "no measurable forgetting",
              "unknown": "forgetting cannot be measured"}[fd["forgetting"]]
        detail.append(
            f"Forgetting: on general held-out data, general→{d} has CE-loss score {f3(ce['finetuned_on_general'])} vs "
            f"{f3(ce['general_on_general'])} for the general SAE ({fg}; "
            f"{_cmp_text(ce['finetuned_on_general'] - ce['general_on_general'], ce['spread_general'])}).")
    out = ["Bottom line: " + "; ".join(bottom) + "."] + detail
    out += _overlap_sentences(res) + _direction_sentences(res) + _steering_sentences(res)
    out.append(f"Yardstick: a difference counts only when it exceeds {FACTOR:g}× the gap between two general SAEs "
               f"that differ only in their seed (one pair of seeds: a rough estimate of run-to-run noise).")
    return out


def _overlap_sentences(res: dict) -> list[str]:
    ov = res["overlap"]
    pairs = ov["pairs"]

    def mf(a: str, b: str) -> float:
        p = pairs.get(f"{a} vs {b}") or {}
        return num((p.get("hungarian") or {}).get("matched_fraction"))

    ctrl = mf(GENERAL, CONTROL)
    parts = [f"general vs its seed control {_pct(ctrl)}"]
    parts += [f"general vs {scratch_name(d)} {_pct(mf(GENERAL, scratch_name(d)))}" for d in res["domains"]]
    parts += [f"general vs {finetuned_name(d)} {_pct(mf(GENERAL, finetuned_name(d)))}" for d in res["domains"]]
    drift = "; ".join(f"{k}: mean cosine {f3(v['mean'])} to the parent's decoder vectors, "
                      f"{_pct(num(v['frac_below_0.9']))} of latents below 0.9" for k, v in ov["drift"].items())
    spec = ", ".join(f"{v['count']} fire only on {d}" for d, v in ov["domain_specific"].items())
    return [f"Dictionaries (latents matched one-to-one at decoder cosine ≥ {ov['threshold']}): " + ", ".join(parts)
            + f". Drift of the fine-tuned decoders: {drift}. Of the general SAE's latents, {spec}."]


def _direction_sentences(res: dict) -> list[str]:
    dr = res["directions"]
    per = dr["per_sae"]
    if not per:
        return []
    cos = {n: num(r.get("reconstruction_cosine")) for n, r in per.items()}
    yard = spread(cos.get(GENERAL), cos.get(CONTROL))
    best = max(cos, key=lambda n: cos[n] if math.isfinite(cos[n]) else -math.inf)
    v = verdict(cos[best] - cos.get(GENERAL, math.nan), yard)
    a, b = dr["labels"]
    return [f"Direction capture ({a} − {b}, difference of means at the hook): {best} reconstructs it best (cosine "
            f"{f3(cos[best])} vs {f3(cos.get(GENERAL))} for the general SAE: "
            + ("no measurable difference" if v == "same" or best == GENERAL else "a real difference")
            + f"; seed-to-seed spread {f3(yard)}); best single latent: " + ", ".join(
                f"{n} {f3(r.get('best_latent_cosine'))}" for n, r in per.items()) + "."]


def _steering_sentences(res: dict) -> list[str]:
    st = res["steering"]
    add = st["add"]
    d = st["domain"]
    names = list(add.get("ce_change", {}))
    if not names:
        return []
    rel = st["relative_strengths"]
    i = len(rel) - 1
    others = [o for o in res["domains"] if o != d]

    def eff(name: str) -> str:
        ch = add["ce_change"][name]
        return (f"{name}: ΔCE {d} {f3(ch[d][i], '{:+.3f}')}, " +
                ", ".join(f"{o} {f3(ch[o][i], '{:+.3f}')}" for o in others))

    def specificity(name: str) -> float:
        ch = add["ce_change"][name]
        return sum(num(ch[o][i]) for o in others) / len(others) - num(ch[d][i])

    spec = {n: specificity(n) for n in names}
    base = spec.get("random", math.nan)
    ranked = [n for n in names if n != "random" and math.isfinite(spec[n])]
    verdicts = [f"{n} {spec[n]:+.3f} ({'favours' if spec[n] > base else 'does not favour'} {d} relative to random)"
                for n in ranked]
    return [f"Steering at {rel[i]}× the mean activation norm (ΔCE in nats/token on held-out text; negative = text made "
            f"more likely): " + "; ".join(eff(n) for n in names) + f". {d}-specificity (mean ΔCE on "
            f"{', '.join(others)} minus ΔCE on {d}; higher = the direction favours {d}): " + "; ".join(verdicts)
            + f"; random baseline {f3(base, '{:+.3f}')}."] + _ablation_sentence(res)


def _ablation_sentence(res: dict) -> list[str]:
    st = res["steering"]
    ab = (st.get("ablate") or {}).get("ce_change") or {}
    if not ab:
        return []
    doms = res["domains"]
    return ["Projecting each direction out of the hook (ablation), ΔCE in nats/token: " + "; ".join(
        f"{n}: " + ", ".join(f"{d} {f3(v[d][0], '{:+.3f}')}" for d in doms) for n, v in ab.items()) + "."]


# ----------------------------------------------------------------------------------------------------------------
# Plots (every plot: title, axis labels with units)

def _plt():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    _plt().close(fig)
    return path


def _tokens_label(n: float) -> str:
    return f"{n / 1e6:g}M" if n >= 1e6 else f"{n / 1e3:g}k" if n >= 1e3 else f"{n:g}"


def _token_axis(ax, ticks: list) -> None:
    """Log x axis with major ticks at the token counts that were run (e.g. "25k"), no minor tick labels."""
    from matplotlib.ticker import NullFormatter
    ticks = sorted({float(t) for t in ticks if t})
    ax.set_xscale("log")
    ax.set_xticks(ticks, labels=[_tokens_label(t) for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())


def make_plots(res: dict, out: Path) -> dict[str, Path]:
    """Every figure of the report as a PNG in ``out``; returns figure name -> path."""
    plt = _plt()
    figs: dict[str, Path] = {}
    saes = list(res["matrix"])
    sets = [GENERAL, *res["domains"]]
    for key, label, fmt in [(CES, "CE-loss score (fraction of CE recovered)", "{:.3f}"),
                            ("metrics/delta_loss", "Δ CE with SAE spliced in (nats/token)", "{:.3f}"),
                            ("metrics/kl_div_score", "KL score (fraction)", "{:.3f}"),
                            (EV, "explained variance (fraction)", "{:.3f}"),
                            (L0, "L0 (active latents per token)", "{:.1f}")]:
        vals = [[res["matrix"][s].get(d, {}).get(key) for d in sets] for s in saes]
        name = "heatmap_" + key.split("/")[-1]
        figs[name] = plot_heatmap(vals, saes, [f"{d} held-out" for d in sets], f"{label}: SAE × eval set",
                                  out / f"{name}.png", value_format=fmt, colorbar_label=label)

    doms = [d for d in res["domains"] if d in res["budgets"]]
    if doms:
        fig, axes = plt.subplots(2, len(doms), figsize=(5.5 * len(doms), 7.5), squeeze=False)
        for j, d in enumerate(doms):
            c, s, f = res["budgets"][d], scratch_name(d), finetuned_name(d)
            yard = recon_spread(res, d)
            for row, key, ylab in ((0, "explained_variance", f"explained variance on held-out {d} (fraction)"),
                                   (1, "l0", "L0 (active latents per token)")):
                ax = axes[row][j]
                ax.plot(c["tokens"], [num(p.get(key)) for p in c["scratch"]], "o-", label=f"{d} from scratch")
                ax.plot(c["tokens"], [num(p.get(key)) for p in c["finetuned"]], "s-",
                        label=f"general fine-tuned on {d}")
                gv = _r(res, GENERAL, d, key)
                ax.axhline(gv, color="grey", ls="--", label="general SAE (no fine-tuning)")
                if row == 0 and math.isfinite(yard):
                    ax.axhspan(gv - FACTOR * yard, gv + FACTOR * yard, color="grey", alpha=0.15,
                               label=f"± {FACTOR:g}× seed-to-seed spread")
                ax.plot([res["saes"][s]["training_tokens"]], [_r(res, s, d, key)], "k*", ms=12,
                        label=f"{s} (main run)")
                ax.plot([res["saes"][f]["training_tokens"]], [_r(res, f, d, key)], "rP", ms=10,
                        label=f"{f} (main run)")
                _token_axis(ax, c["tokens"] + [res["saes"][s]["training_tokens"], res["saes"][f]["training_tokens"]])
                ax.set_xlabel(f"{d} training tokens (log scale)")
                ax.set_ylabel(ylab)
                ax.set_title(f"Token efficiency on {d}: {'explained variance' if row == 0 else 'sparsity'}")
                ax.legend(fontsize=7)
        figs["token_efficiency"] = _save(fig, out / "token_efficiency.png")

        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for d in doms:
            c = res["budgets"][d]
            ax.plot(c["tokens"], [num(p.get("explained_variance")) for p in c["finetuned_on_general"]], "o-",
                    label=f"general fine-tuned on {d}")
        gv, yard = _r(res, GENERAL, GENERAL), recon_spread(res, GENERAL)
        ax.axhline(gv, color="grey", ls="--", label="general SAE")
        if math.isfinite(yard):
            ax.axhspan(gv - FACTOR * yard, gv + FACTOR * yard, color="grey", alpha=0.15,
                       label=f"± {FACTOR:g}× seed-to-seed spread")
        _token_axis(ax, [t for d in doms for t in res["budgets"][d]["tokens"]])
        ax.set_xlabel("fine-tuning tokens (log scale)")
        ax.set_ylabel("explained variance on general held-out (fraction)")
        ax.set_title("Forgetting: fine-tuned SAEs on general data")
        ax.legend(fontsize=8)
        figs["forgetting"] = _save(fig, out / "forgetting.png")

    pairs = res["overlap"]["pairs"]
    if pairs:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        for name, p in pairs.items():
            for ax, key in zip(axes, ("max_cos_a_to_b", "max_cos_b_to_a")):
                e, c = p[key]["hist_edges"], p[key]["hist_counts"]
                ax.step(e[:-1], c, where="post", label=name)
        for ax, t in zip(axes, ("each latent of the first SAE → nearest in the second",
                                "each latent of the second SAE → nearest in the first")):
            ax.axvline(res["overlap"]["threshold"], color="k", ls=":", lw=0.8)
            ax.set_xlabel("max decoder cosine (unitless)")
            ax.set_ylabel("latents (count)")
            ax.set_title(f"Nearest-latent cosine: {t}", fontsize=10)
            ax.set_xlim(-0.2, 1.0)
        axes[1].legend(fontsize=7)
        figs["max_cosine"] = _save(fig, out / "max_cosine.png")

        fig, ax = plt.subplots(figsize=(7, 0.45 * len(pairs) + 1.6))
        names = list(pairs)
        vals = [num((pairs[n].get("hungarian") or {}).get("matched_fraction")) for n in names]
        colors = ["#888888" if CONTROL in n else "#1f77b4" for n in names]
        ax.barh(range(len(names)), vals, color=colors)
        ax.set_yticks(range(len(names)), labels=names)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel(f"fraction of latents matched one-to-one at cosine ≥ {res['overlap']['threshold']}")
        ax.set_ylabel("SAE pair")
        ax.set_title("Hungarian matching (grey: seed-vs-seed control)")
        figs["matching"] = _save(fig, out / "matching.png")

    drift = res["overlap"]["drift"]
    if drift:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for name, dr in drift.items():
            e, c = dr["hist_edges"], dr["hist_counts"]
            ax.step(e[:-1], c, where="post", label=name)
        ax.set_yscale("log")
        ax.set_xlabel("cosine of each latent's decoder vector to its value before fine-tuning (unitless)")
        ax.set_ylabel("latents (count, log scale)")
        ax.set_title("Drift of fine-tuned latents from the general SAE")
        ax.legend(fontsize=8)
        figs["drift"] = _save(fig, out / "drift.png")

    per = res["directions"]["per_sae"]
    if per:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        for name, r in per.items():
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
        figs["direction_capture"] = _save(fig, out / "direction_capture.png")

    st = res["steering"]
    ce = st["add"].get("ce_change", {})
    if ce:
        doms = res["domains"]
        fig, axes = plt.subplots(1, len(doms), figsize=(5.5 * len(doms), 4.2), squeeze=False)
        for ax, d in zip(axes[0], doms):
            for name, per_dom in ce.items():
                ax.plot(st["relative_strengths"], [num(v) for v in per_dom[d]], "o-", label=name)
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xlabel("steering strength (× mean activation norm at the hook)")
            ax.set_ylabel(f"Δ CE on held-out {d} (nats/token)")
            ax.set_title(f"Adding a direction: effect on {d}")
        axes[0][-1].legend(fontsize=7)
        figs["steering"] = _save(fig, out / "steering.png")
    return figs


# ----------------------------------------------------------------------------------------------------------------
# Document model: blocks rendered to Markdown and to HTML

def _blocks(res: dict, figs: dict[str, Path]) -> list[tuple]:
    cfg, data = res["config"], res.get("data", {})
    sets = [GENERAL, *res["domains"]]
    saes = list(res["matrix"])
    B: list[tuple] = [("h1", "Domain-specific SAEs: does fine-tuning a general SAE match a domain SAE?"),
                      ("p", res.get("question", "")), ("h2", "Answer"), ("ul", res["answer"])]
    model = res["model"]
    B.append(("p", f"Model {model['name']} at {model['hook']} (d_in {model.get('d_in')}, d_sae {model.get('d_sae')}). "
                   f"Domains: " + ", ".join(f"{d} = {cfg['domains'][d]}" for d in res["domains"])
              + "; general = equal shares of every domain."))

    B.append(("h2", "SAEs"))
    B.append(("table", ["SAE", "kind", "training tokens", "total tokens (incl. parent)", "seed"],
              [[n, s["kind"], f"{s['training_tokens']:,}", f"{s['total_tokens']:,}", s["seed"]]
               for n, s in res["saes"].items()]))

    B.append(("h2", "Matrix: every SAE on every held-out set"))
    es = data.get("eval_sets", {})
    if es:
        B.append(("p", "Held-out tokens per eval set (special tokens excluded from the counts): " + "; ".join(
            f"{k}: {v['tokens']:,} tokens, {v['lm_counted']:,} next-token targets, "
            f"{v['reconstruction_counted']:,} reconstructed" for k, v in es.items()) + "."))
    for key, label, spec in [(CES, "CE-loss score (1 = as good as the clean model, 0 = as bad as zero-ablation)",
                              "{:.3f}"),
                             ("metrics/delta_loss", "Δ CE with the SAE spliced in (nats/token)", "{:+.3f}"),
                             ("metrics/kl_div_score", "KL score", "{:.3f}"), (EV, "explained variance", "{:.3f}"),
                             (L0, "L0 (active latents per token)", "{:.1f}"),
                             ("sparsity/dead_fraction", "dead fraction (never fired on the set)", "{:.3f}")]:
        rows = [[s] + [f3(res["matrix"][s].get(d, {}).get(key), spec) for d in sets] for s in saes]
        rows.append(["seed-to-seed spread"] + [f3(matrix_spread(res, d, key), "{:.3f}") for d in sets])
        B += [("p", f"**{label}**"), ("table", ["SAE"] + [f"{d} held-out" for d in sets], rows)]
    clean = [f"{d} {f3(_m(res, GENERAL, d, 'metrics/ce_loss_without_sae'))} / "
             f"{f3(_m(res, GENERAL, d, 'metrics/ce_loss_with_ablation'))}" for d in sets]
    B.append(("p", "CE without SAE / with zero-ablation (nats/token): " + ", ".join(clean) + "."))
    seg_tables = []
    for d in res["domains"]:
        segs = (res["matrix"][GENERAL].get(d, {}) or {}).get("segments") or {}
        names = [n for n in segs if segs[n].get("tokens/reconstruction_counted", 1)]
        if len(names) > 1:
            rows = [[s] + [f"{f3(((res['matrix'][s][d].get('segments') or {}).get(n) or {}).get(EV))} / "
                           f"{f3(((res['matrix'][s][d].get('segments') or {}).get(n) or {}).get(CES))}"
                           for n in names] for s in saes]
            seg_tables += [("p", f"**{d} held-out by segment** (explained variance / CE-loss score)"),
                           ("table", ["SAE"] + names, rows)]
    B += seg_tables
    B += [("fig", k) for k in ("heatmap_ce_loss_score", "heatmap_explained_variance", "heatmap_delta_loss",
                               "heatmap_kl_div_score", "heatmap_l0") if k in figs]

    B.append(("h2", "Token efficiency and forgetting"))
    B.append(("p", "Reconstruction on the held-out reconstruction sets (" + ", ".join(
        f"{k} {v:,}" for k, v in data.get("recon_tokens_counted", {}).items()) + " tokens). Fine-tuned budgets count "
        f"only the fine-tuning tokens; every fine-tuned SAE also carries the general SAE's "
        f"{cfg['general_tokens']:,} tokens."))
    for d in res["domains"]:
        c = res["budgets"].get(d)
        if not c:
            continue
        rows = [[f"{t:,}", f3(a.get("explained_variance")), f3(b.get("explained_variance")),
                 f3(a.get("l0"), "{:.1f}"), f3(b.get("l0"), "{:.1f}"), f3(g.get("explained_variance"))]
                for t, a, b, g in zip(c["tokens"], c["scratch"], c["finetuned"], c["finetuned_on_general"])]
        B += [("p", f"**{d}** (general SAE EV {f3(_r(res, GENERAL, d))}; {scratch_name(d)} at "
                    f"{cfg['scratch_tokens']:,} tokens {f3(_r(res, scratch_name(d), d))}; seed-to-seed spread "
                    f"{f3(recon_spread(res, d))})"),
              ("table", ["tokens", "EV scratch", "EV fine-tuned", "L0 scratch", "L0 fine-tuned",
                         "fine-tuned EV on general"], rows)]
    B += [("fig", k) for k in ("token_efficiency", "forgetting") if k in figs]

    ov = res["overlap"]
    B.append(("h2", "Dictionary overlap"))
    rows = [[k, f3(p["max_cos_a_to_b"]["mean"]), f3(p["max_cos_b_to_a"]["mean"]),
             f3((p.get("hungarian") or {}).get("matched_fraction")),
             f3((p.get("hungarian") or {}).get("mean_cosine"))] for k, p in ov["pairs"].items()]
    B.append(("table", ["pair", "mean max-cos (first → second)", "mean max-cos (second → first)",
                        f"matched one-to-one at ≥ {ov['threshold']}", "mean matched cosine"], rows))
    B.append(("ul", [f"Drift {k}: mean cosine to the parent's decoder vector {f3(v['mean'])} (median "
                     f"{f3(v['median'])}); {_pct(num(v['frac_below_0.9']))} of latents below 0.9, "
                     f"{_pct(num(v.get('frac_below_0.5')))} below 0.5." for k, v in ov["drift"].items()]))
    items = []
    for d, v in ov["domain_specific"].items():
        items.append(f"General SAE latents that fire on {d} (density ≥ 1e-3) and never on the other domains: "
                     f"{v['count']}.")
        for t in v["top"]:
            ex = " | ".join(f"{e.get('prefix', '')}[[{e.get('token', '')}]]{e.get('suffix', '')}"
                            .replace("\n", "⏎") for e in t["examples"][:3])
            items.append(f"latent {t['latent']} (density {t['density']:.4f}): {ex}")
    B.append(("ul", items))
    B += [("fig", k) for k in ("matching", "max_cosine", "drift") if k in figs]

    dr = res["directions"]
    a, b = dr["labels"]
    B.append(("h2", f"Direction capture: {a} − {b}"))
    B.append(("p", f"Difference of the mean hook activations of {dr['n_prompts'][0]} {a} prompts and "
                   f"{dr['n_prompts'][1]} {b} prompts (user tokens of the chat-rendered prompt). Examples: "
                   + "; ".join(repr(p) for p in dr["example_prompts"][0][:2]) + " vs "
                   + "; ".join(repr(p) for p in dr["example_prompts"][1][:2]) + "."))
    rows = []
    for n, r in dr["per_sae"].items():
        ks = r["ks"]
        at = {k: i for i, k in enumerate(ks)}
        rows.append([n, f3(r["reconstruction_cosine"]), f3(r["best_latent_cosine"]), r["best_latent"],
                     *(f3(r["topk_lstsq_rel_error"][at[k]]) if k in at else "n/a" for k in (1, 8, 64)),
                     *(f3(r["omp_rel_error"][at[k]]) if k in at else "n/a" for k in (1, 8, 64))])
    B.append(("table", ["SAE", "reconstruction cosine", "best single-latent cosine", "latent",
                        "top-k LS error k=1", "k=8", "k=64", "OMP error k=1", "k=8", "k=64"], rows))
    B += [("fig", "direction_capture")] if "direction_capture" in figs else []

    st = res["steering"]
    B.append(("h2", "Steering"))
    chosen = "; ".join(f"{n}: latent {c['latent']} (mean activation difference {f3(c['mean_activation_difference'])}"
                       f")" for n, c in st["chosen"].items())
    B.append(("p", f"Directions added at the hook as unit vectors times {st['relative_strengths']} × the mean "
                   f"activation norm ({f3(st['mean_activation_norm'], '{:.2f}')}): {st['domain']} latents with the "
                   f"largest {st['domain']}-minus-other mean activation on held-out data ({chosen}), the "
                   f"difference-of-means direction and a random direction of equal norm. ΔCE in nats/token on "
                   f"held-out text ({', '.join(f'{k} {v:,} tokens' for k, v in st.get('tokens', {}).items())}); "
                   f"clean CE: " + ", ".join(f"{k} {f3(v)}" for k, v in st["add"]["clean_ce"].items()) + "."))
    rows = [[n] + [" / ".join(f3(v, "{:+.3f}") for v in per_dom[d]) for d in res["domains"]]
            for n, per_dom in st["add"]["ce_change"].items()]
    B.append(("table", ["direction (added)"] + [f"ΔCE {d} at each strength" for d in res["domains"]], rows))
    rows = [[n] + [f3(per_dom[d][0], "{:+.3f}") for d in res["domains"]]
            for n, per_dom in st["ablate"]["ce_change"].items()]
    B.append(("table", ["direction (projected out)"] + [f"ΔCE {d}" for d in res["domains"]], rows))
    B += [("fig", "steering")] if "steering" in figs else []
    gens = st["add"].get("generations") or {}
    if gens.get("clean"):
        strengths = [str(float(x)) for x in st["add"]["strengths"]]
        def cell(text: str) -> str:
            return text.replace("\n", "⏎")

        for i, prompt in enumerate(st["prompts"]):
            rows = [["none (clean)"] + [cell(gens["clean"][i])] * len(strengths)]
            for n in st["add"]["ce_change"]:
                rows.append([n] + [cell(gens[n][s][i]) if s in gens.get(n, {}) else "n/a" for s in strengths])
            B += [("p", f"Greedy continuations of the prompt {prompt!r}, side by side (⏎ = newline):"),
                  ("table", ["direction added"] + [f"{rel}× norm" for rel in st["relative_strengths"]], rows)]

    B.append(("h2", "Run"))
    stages = res.get("stages", {})
    est = (res.get("estimate") or {})
    rows = [[k, f"{v.get('seconds', 0):.0f}", ", ".join(f"{n:,} {kind}" for kind, n in
                                                          (v.get("tokens") or {}).items()) or "-", v.get("what", "")]
            for k, v in stages.items()]
    rows.append(["total", f"{num(res.get('timing_seconds', {}).get('total')):.0f}", "", ""])
    B.append(("p", "Wall-clock time of each stage and the tokens it processed (truncated = model run up to the "
                   "hook; full = full model forward; sae = SAE training tokens; generated = greedy steps)"
              + (f"; estimate before the run: {est['minutes']} min ({est.get('rates', {}).get('source', '')})"
                 if est else "") + "."))
    B.append(("table", ["stage", "seconds", "tokens", "what"], rows))
    B.append(("p", "Cached training tokens per domain: " + ", ".join(
        f"{k} {v:,}" for k, v in data.get("cache_tokens", {}).items()) + "."))
    B.append(("pre", json.dumps(cfg, indent=1)))
    if res.get("versions"):
        B.append(("p", "Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + "."))
    return B


def _md_cell(c: Any) -> str:
    return str(c).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[tuple], figs: dict[str, Path]) -> str:
    out: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind == "h1":
            out += [f"# {b[1]}", ""]
        elif kind == "h2":
            out += [f"## {b[1]}", ""]
        elif kind == "p":
            out += [b[1], ""]
        elif kind == "ul":
            out += [f"- {x}" for x in b[1]] + [""]
        elif kind == "table":
            out += ["| " + " | ".join(_md_cell(h) for h in b[1]) + " |", "|" + "---|" * len(b[1])]
            out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in b[2]] + [""]
        elif kind == "fig":
            out += [f"![{b[1]}]({figs[b[1]].name})", ""]
        elif kind == "pre":
            out += ["```", b[1], "```", ""]
    return "\n".join(out)


def _inline(text: str) -> str:
    """HTML-escape, then render **bold**."""
    parts = html.escape(str(text)).split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def render_html(blocks: list[tuple], figs: dict[str, Path], title: str = "domain-sae study") -> str:
    body: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{_inline(b[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline(b[1])}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in b[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{_inline(h)}</th>" for h in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in b[2])
            body.append(f"<table><tr>{head}</tr>{rows}</table>")
        elif kind == "fig":
            data = base64.b64encode(figs[b[1]].read_bytes()).decode()
            body.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(b[1])}'>"
                        f"<figcaption>{html.escape(figs[b[1]].name)}</figcaption></figure>")
        elif kind == "pre":
            body.append(f"<pre>{html.escape(b[1])}</pre>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;line-height:1.45}"
             "table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "font-size:13px;vertical-align:top}th{background:#f3f3f3}img{max-width:100%}figure{margin:1em 0}"
             "figcaption{font-size:12px;color:#666}pre{background:#f6f6f6;padding:.6em;font-size:12px;"
             "overflow-x:auto}")
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# ----------------------------------------------------------------------------------------------------------------

def check_results(res: dict) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in res]
    if missing:
        raise ReportError(f"The results lack {missing}; they do not come from `dsae compare` (schema version 1). "
                          f"Re-run the study to regenerate results.json.")
    for name in (GENERAL, CONTROL):
        if name not in res["matrix"]:
            raise ReportError(f"The results lack the {name!r} SAE, which the report needs as its yardstick.")


def write_report(results: dict, out: str | Path) -> dict[str, Path]:
    """Write results.json (with the answer), the PNG plots, report.md and report.html into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    res = jsonable(results)
    check_results(res)
    res["answer"] = answer(res)
    results["answer"] = res["answer"]
    (out / "results.json").write_text(json.dumps(res, indent=1, allow_nan=False) + "\n")
    figs = make_plots(res, out)
    blocks = _blocks(res, figs)
    (out / "report.md").write_text(render_markdown(blocks, figs))
    (out / "report.html").write_text(render_html(blocks, figs))
    return {"report_html": out / "report.html", "report_md": out / "report.md", "results_json": out / "results.json"}


def render_from_json(results_json: str | Path, out: Optional[str | Path] = None) -> dict[str, Path]:
    """Re-render the report from a results.json (e.g. after changing the report code)."""
    p = Path(results_json)
    return write_report(json.loads(p.read_text()), out or p.parent)
