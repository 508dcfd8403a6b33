"""The numbers behind the study's answer, and the answer in sentences (read from the JSON-ready results dict).

The yardstick for "a real difference" is the seed-to-seed spread: for a metric m on an eval set,
``spread = |m(general) - m(general, other seed)|`` (the two general SAEs differ only in their seed), floored at
:data:`MIN_SPREAD`. A difference counts when it exceeds ``FACTOR * spread`` (:func:`verdict`); otherwise the report
says there is no measurable difference. One pair of seeds is a rough yardstick, and the report says so.
"""

from __future__ import annotations

import math
from typing import Any

from .config import CONTROL, GENERAL, finetuned_name, scratch_name

CES, EV, L0 = "metrics/ce_loss_score", "metrics/explained_variance", "metrics/l0"
MIN_SPREAD = 0.002
FACTOR = 2.0  # a difference is real when it exceeds FACTOR x the seed-to-seed spread


# ----------------------------------------------------------------------------------------------------------------
# Numbers and comparisons

def num(x: Any) -> float:
    """float, with None (a NaN in results.json) as NaN."""
    return math.nan if x is None else float(x)


def fmt(x: Any, spec: str = "{:.3f}") -> str:
    """``x`` formatted with ``spec``; ``n/a`` when missing or not finite."""
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


def compare_text(delta: float, yard: float) -> str:
    v = verdict(delta, yard)
    if v == "unknown":
        return "cannot be compared (a value is missing)"
    rel = "more" if v != "same" else "less"
    tail = "" if v != "same" else ": no measurable difference"
    return f"Δ {delta:+.3f}, {rel} than {FACTOR:g}× the seed-to-seed spread of {yard:.3f}{tail}"


def matrix_value(res: dict, sae: str, ds: str, key: str) -> float:
    """Metric ``key`` of SAE ``sae`` on eval set ``ds`` in the matrix (NaN when absent)."""
    return num(res["matrix"].get(sae, {}).get(ds, {}).get(key))


def recon_value(res: dict, sae: str, ds: str, key: str = "explained_variance") -> float:
    """Reconstruction metric ``key`` of ``sae`` on the held-out reconstruction set ``ds`` (NaN when absent)."""
    return num(res["recon"].get(sae, {}).get(ds, {}).get(key))


def matrix_spread(res: dict, ds: str, key: str) -> float:
    return spread(matrix_value(res, GENERAL, ds, key), matrix_value(res, CONTROL, ds, key))


def recon_spread(res: dict, ds: str, key: str = "explained_variance") -> float:
    return spread(recon_value(res, GENERAL, ds, key), recon_value(res, CONTROL, ds, key))


def pct(x: float) -> str:
    return f"{100 * x:.0f}%" if math.isfinite(x) else "n/a"


# ----------------------------------------------------------------------------------------------------------------
# The answer

def domain_findings(res: dict, d: str) -> dict[str, Any]:
    """The numbers behind the answer for domain ``d`` (CE-loss score is the primary metric; EV secondary)."""
    g, s, f = GENERAL, scratch_name(d), finetuned_name(d)
    out: dict[str, Any] = {"domain": d}
    for key, short in ((CES, "ce"), (EV, "ev"), (L0, "l0")):
        out[short] = {n: matrix_value(res, name, d, key)
                      for n, name in (("general", g), ("scratch", s), ("finetuned", f))}
        out[short]["spread"] = matrix_spread(res, d, key)
        out[short]["general_on_general"] = matrix_value(res, g, GENERAL, key)
        out[short]["finetuned_on_general"] = matrix_value(res, f, GENERAL, key)
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
        full = recon_value(res, s, d)
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
    bottom, detail = [], []
    for d in res["domains"]:
        b, sentences = _domain_sentences(res, d)
        bottom.append(b)
        detail += sentences
    out = ["Bottom line: " + "; ".join(bottom) + "."] + detail
    out += _overlap_sentences(res) + _direction_sentences(res) + _steering_sentences(res)
    out.append(f"Yardstick: a difference counts only when it exceeds {FACTOR:g}× the gap between two general SAEs "
               f"that differ only in their seed (one pair of seeds: a rough estimate of run-to-run noise).")
    return out




def _domain_sentences(res: dict, d: str) -> tuple[str, list[str]]:
    """Domain ``d``'s part of the bottom line, and its detailed sentences (benefit, fine-tuning, token efficiency,
    forgetting)."""
    cfg = res["config"]
    n = len(res["domains"])
    ft_tok, sc_tok, gen_tok = cfg["finetune_tokens"], cfg["scratch_tokens"], cfg["general_tokens"]
    share = ft_tok / sc_tok
    fd = domain_findings(res, d)
    ce, ev, l0 = fd["ce"], fd["ev"], fd["l0"]
    detail: list[str] = []
    if fd["benefit"] == "unknown":
        bottom = f"on {d}, the comparison is incomplete (missing numbers)"
    elif fd["benefit"] != "yes":
        extra = (f", although the fine-tuned SAE beats the general one (CE-loss score "
                 f"{ce['finetuned'] - ce['general']:+.3f})" if fd["ft_vs_general"] == "better" else "")
        bottom = (f"on {d}, there is no domain benefit to recover at this budget (the {d} SAE trained from "
                  f"scratch does not beat the general SAE beyond the seed-to-seed spread){extra}")
    elif fd["ft_vs_scratch"] in ("same", "better"):
        bottom = (f"on {d}, yes: fine-tuning on {ft_tok:,} tokens ({share:.0%} of the scratch budget) "
                  f"matches{' or beats' if fd['ft_vs_scratch'] == 'better' else ''} the {d} SAE trained "
                  f"from scratch")
    else:
        bottom = (f"on {d}, not at this budget: fine-tuning on {ft_tok:,} tokens recovers "
                  f"{pct(fd['recovered'])} of the scratch SAE's advantage")
    detail.append(
        f"On held-out {d}, the {d} SAE trained from scratch ({sc_tok:,} tokens) has CE-loss score "
        f"{fmt(ce['scratch'])} vs {fmt(ce['general'])} for the general SAE ({gen_tok:,} tokens, 1/{n} {d}) "
        f"({compare_text(ce['scratch'] - ce['general'], ce['spread'])}); explained variance {fmt(ev['scratch'])} vs "
        f"{fmt(ev['general'])} ({compare_text(ev['scratch'] - ev['general'], ev['spread'])}), at L0 "
        f"{fmt(l0['scratch'], '{:.1f}')} vs {fmt(l0['general'], '{:.1f}')}.")
    detail.append(
        f"The general SAE fine-tuned on {ft_tok:,} {d} tokens reaches CE-loss score {fmt(ce['finetuned'])} "
        f"(vs scratch: {compare_text(ce['finetuned'] - ce['scratch'], ce['spread'])}; vs general: "
        f"{compare_text(ce['finetuned'] - ce['general'], ce['spread'])}) and explained variance "
        f"{fmt(ev['finetuned'])} at L0 {fmt(l0['finetuned'], '{:.1f}')}"
        + (f"; it recovers {pct(fd['recovered'])} of the scratch SAE's CE-score gain over the general SAE."
           if math.isfinite(fd["recovered"]) else "."))
    cur = fd.get("curve")
    if cur:
        top = max(res["budgets"][d]["tokens"])
        reach = (f"the fine-tuned SAE reaches the full scratch SAE's EV ({fmt(cur['scratch_full'])}, within the "
                 f"spread) from {cur['ft_reaches_full_at']:,} tokens" if cur["ft_reaches_full_at"] is not None
                 else f"no fine-tuning budget up to {top:,} tokens reaches the full scratch SAE's EV "
                  f"({fmt(cur['scratch_full'])}) within the spread")
        reach_s = (f", the scratch ladder from {cur['scratch_reaches_full_at']:,}"
                   if cur["scratch_reaches_full_at"] is not None else f", the scratch ladder (up to {top:,}) "
                                                                     f"does not")
        l0s = {k: [num(p.get("l0")) for p in res["budgets"][d][k]] for k in ("scratch", "finetuned")}
        detail.append(
            f"Token efficiency on {d} (explained variance on the larger held-out reconstruction set, spread "
            f"{fmt(cur['spread'])}): at equal budgets the "
            f"fine-tuned SAE is ahead at {cur['ft_wins']} of {cur['n']} budgets and behind at "
            f"{cur['scratch_wins']}; {reach}{reach_s} (fine-tuned budgets exclude the general SAE's own "
            f"{gen_tok:,} tokens). L0 along the ladder: scratch "
            + " → ".join(fmt(v, "{:.0f}") for v in l0s["scratch"]) + ", fine-tuned "
            + " → ".join(fmt(v, "{:.0f}") for v in l0s["finetuned"])
            + " (EV at a higher L0 is cheaper: compare with the sparsity in mind).")
    fg = {"forgets": "it forgets", "improves": "it even improves", "same": "no measurable forgetting",
          "unknown": "forgetting cannot be measured"}[fd["forgetting"]]
    detail.append(
        f"Forgetting: on general held-out data, general→{d} has CE-loss score {fmt(ce['finetuned_on_general'])} vs "
        f"{fmt(ce['general_on_general'])} for the general SAE ({fg}; "
        f"{compare_text(ce['finetuned_on_general'] - ce['general_on_general'], ce['spread_general'])}).")
    return bottom, detail

def _overlap_sentences(res: dict) -> list[str]:
    ov = res["overlap"]
    pairs = ov["pairs"]

    def mf(a: str, b: str) -> float:
        p = pairs.get(f"{a} vs {b}") or {}
        return num((p.get("hungarian") or {}).get("matched_fraction"))

    ctrl = mf(GENERAL, CONTROL)
    parts = [f"general vs its seed control {pct(ctrl)}"]
    parts += [f"general vs {scratch_name(d)} {pct(mf(GENERAL, scratch_name(d)))}" for d in res["domains"]]
    parts += [f"general vs {finetuned_name(d)} {pct(mf(GENERAL, finetuned_name(d)))}" for d in res["domains"]]
    drift = "; ".join(f"{k}: mean cosine {fmt(v['mean'])} to the parent's decoder vectors, "
                      f"{pct(num(v['frac_below_0.9']))} of latents below 0.9" for k, v in ov["drift"].items())
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
            f"{fmt(cos[best])} vs {fmt(cos.get(GENERAL))} for the general SAE: "
            + ("no measurable difference" if v == "same" or best == GENERAL else "a real difference")
            + f"; seed-to-seed spread {fmt(yard)}); best single latent: " + ", ".join(
                f"{n} {fmt(r.get('best_latent_cosine'))}" for n, r in per.items()) + "."]


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
        return (f"{name}: ΔCE {d} {fmt(ch[d][i], '{:+.3f}')}, " +
                ", ".join(f"{o} {fmt(ch[o][i], '{:+.3f}')}" for o in others))

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
            + f"; random baseline {fmt(base, '{:+.3f}')}."] + _ablation_sentence(res)


def _ablation_sentence(res: dict) -> list[str]:
    st = res["steering"]
    ab = (st.get("ablate") or {}).get("ce_change") or {}
    if not ab:
        return []
    doms = res["domains"]
    return ["Projecting each direction out of the hook (ablation), ΔCE in nats/token: " + "; ".join(
        f"{n}: " + ", ".join(f"{d} {fmt(v[d][0], '{:+.3f}')}" for d in doms) for n, v in ab.items()) + "."]
