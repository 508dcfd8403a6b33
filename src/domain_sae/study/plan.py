"""The study's plan, printed before it starts: runs, tokens per kind of work and a time estimate.

Time = tokens / throughput, per kind of work (rates assumed for the offline default on 2 CPU cores, :data:`ASSUMED`):

- truncated forward (the caches: one pass per corpus for all hooks, to the deepest hook; a pass to layer L costs
  the fraction (L + 1) / 30 of a full pass, at least the layer-0 rate),
- full forward (model-pass metrics: per group of SAEs one clean and one ablation pass plus one per SAE; steering;
  the end-to-end runs, about three passes a token),
- SAE training steps (scaled by ``d_in * d_sae`` relative to the reference size), per-run overhead,
- fixed costs (model load, Hungarian matching ~ d_sae^3, the feature store).

A resumed study skips what is on disk; the estimate counts everything. With ``train_to_plateau`` the general and
scratch SAEs (and scratch_total) are counted at their cap ``plateau_max_tokens`` and the caches at what they may
need, so the estimate is an upper bound (a run that plateaus, or a corpus whose training split is smaller, costs
less).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import StudyConfig
from .measure import CE_GROUP
from .runs import KINDS, cache_tokens, eval_sets, plan_runs, wants_lm

REFERENCE_D_IN, REFERENCE_D_SAE = 576, 2304   # the offline default at expansion 4, where the rates were measured
N_LAYERS = 30


@dataclass(frozen=True)
class Throughput:
    """Rates of the estimate; tokens per second unless the name says otherwise."""

    truncated_tokens_per_s: float = 12_000.0   # incl. tokenisation, layer 0
    full_tokens_per_s: float = 570.0           # ~1.8 s per 1024 tokens (SmolLM2-135M, 2 cores)
    sae_tokens_per_s: float = 8_000.0          # at d_in * d_sae = REFERENCE, batch 4096
    generate_seconds_per_token: float = 0.12   # one full forward on a chat prompt (no KV cache)
    load_seconds: float = 15.0
    run_overhead_seconds: float = 2.0          # per SAE training run: first buffer, scale estimate, saving
    hungarian_seconds_at_reference: float = 0.5
    source: str = "assumed (SmolLM2-135M on 2 CPU cores)"

    def sae_rate(self, d_in: int, d_sae: int) -> float:
        return self.sae_tokens_per_s * REFERENCE_D_IN * REFERENCE_D_SAE / max(1, d_in * d_sae)

    def truncated_rate(self, hook: str) -> float:
        parts = hook.split(".")
        frac = min(1.0, (int(parts[1]) + 1) / N_LAYERS) if len(parts) > 1 and parts[1].isdigit() else 1.0
        return min(self.truncated_tokens_per_s, self.full_tokens_per_s / frac)


ASSUMED = Throughput()


def estimate(cfg: StudyConfig, rates: Throughput = ASSUMED, d_in: int = REFERENCE_D_IN) -> dict:
    """Seconds per stage (``load``, ``caches``, then per hook ``train``, ``measure``, ``analyses``) and the total in
    minutes, with the token counts behind them."""
    d_sae = cfg.d_sae or cfg.expansion_factor * d_in
    runs = plan_runs(cfg)
    n_dom = len(cfg.domains)
    deepest = max(cfg.hooks, key=lambda h: 1.0 / rates.truncated_rate(h))
    cached = sum(cache_tokens(cfg, c) + cfg.heldout_tokens() for c in cfg.corpora())
    stages = {"load": {"seconds": rates.load_seconds, "tokens": {}},
              "caches": {"seconds": cached / rates.truncated_rate(deepest), "tokens": {"truncated": cached}}}
    shared = cfg.train_to_plateau and "scratch_total" in cfg.conditions  # taken from the scratch runs
    sae_tokens = sum(r.tokens(cfg) for r in runs if not KINDS[r.kind].live
                     and not (shared and r.kind == "scratch_total"))
    live_tokens = sum(r.tokens(cfg) for r in runs if KINDS[r.kind].live)
    pairs = sum(1 for r in runs for s in eval_sets(cfg, r) if wants_lm(cfg, r, s))
    lm_full = (pairs + 2 * math.ceil(pairs / CE_GROUP) * (n_dom + 1)) * cfg.eval_tokens
    strengths = len(cfg.steering_strengths)
    steer_full = n_dom * cfg.steering_tokens * (1 + 4 * strengths + 3) if "steering" in cfg.analyses else 0
    n_prompts = len(cfg.generation_prompts) or 2  # default: the first two prompts of set B
    generated = n_prompts * (1 + 4 * strengths) * cfg.generate_tokens if "steering" in cfg.analyses else 0
    n_pairs = 2 + 2 * n_dom + n_dom * (n_dom - 1) // 2 if "overlap" in cfg.analyses else 0
    if "convergence" in cfg.analyses and len(cfg.seeds) > 1:
        n_pairs += (1 + n_dom) * len(cfg.seeds) * (len(cfg.seeds) - 1) // 2
    fixed = n_pairs * rates.hungarian_seconds_at_reference * (d_sae / REFERENCE_D_SAE) ** 3
    fixed += (60.0 if "features" in cfg.analyses else 0) + (30.0 if "probing" in cfg.analyses else 0)
    for hook in cfg.hooks:
        stages[f"{hook}: train"] = {"seconds": sae_tokens / rates.sae_rate(d_in, d_sae) + len(runs)
                                    * rates.run_overhead_seconds + 3 * live_tokens / rates.full_tokens_per_s,
                                    "tokens": {"sae": sae_tokens, "full": 3 * live_tokens}, "runs": len(runs)}
        stages[f"{hook}: measure"] = {"seconds": lm_full / rates.full_tokens_per_s, "tokens": {"full": lm_full}}
        stages[f"{hook}: analyses"] = {"seconds": steer_full / rates.full_tokens_per_s + fixed
                                       + generated * rates.generate_seconds_per_token,
                                       "tokens": {"full": steer_full, "generated": generated}}
    total = sum(s["seconds"] for s in stages.values()) + 10.0
    return {"stages": {k: {**v, "seconds": round(v["seconds"], 1)} for k, v in stages.items()},
            "runs_per_hook": len(runs), "minutes": round(total / 60, 1), "rates": rates.source,
            "upper_bound": bool(cfg.train_to_plateau)}


def estimate_minutes(cfg: StudyConfig, rates: Throughput = ASSUMED) -> float:
    return estimate(cfg, rates)["minutes"]


def format_plan(cfg: StudyConfig, est: dict) -> str:
    """The plan as printed before the study starts."""
    lines = [f"Study plan: hooks {cfg.hooks}; {est['runs_per_hook']} SAEs per hook ({cfg.architecture}, "
             f"{cfg.knob_label} {cfg.sparsity}, seeds {cfg.seeds}"
             + (f" + control {cfg.control_seed}" if cfg.control_seed is not None else "")
             + f"); conditions {cfg.conditions}; budgets {cfg.budgets}; analyses {cfg.analyses}"]
    for name, s in est["stages"].items():
        toks = ", ".join(f"{v:,} {k}" for k, v in s["tokens"].items() if v)
        lines.append(f"  {name:<40} ~{_duration(s['seconds']):>8}" + (f"  [{toks} tokens]" if toks else ""))
    bound = ("; at most: the reference SAEs counted at plateau_max_tokens, a plateau stops them sooner"
             if est.get("upper_bound") else "")
    lines.append(f"  {'total':<40} ~{_duration(est['minutes'] * 60):>8}  (throughputs {est['rates']}; a resumed "
                 f"study skips what is on disk{bound})")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"
