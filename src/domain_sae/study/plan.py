"""The study's plan: what each stage computes, how many tokens it touches, and how long it should take.

Time = tokens / throughput, per kind of work:

- truncated forward (model run only up to the hook: activation caches, held-out activations, prompts),
- full forward (CE/KL with the SAE spliced in, steering CE, one forward per generated token),
- SAE training steps (scaled by ``d_in * d_sae`` relative to the reference size),
- fixed costs (model load, per-training-run setup, Hungarian matching ~ d_sae^3).

Throughputs are assumed for the offline default on 2 CPU cores (:data:`ASSUMED`); as stages finish, :func:`refine`
replaces them with the rates of the real work done on this machine and the study prints the remaining time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

from .config import StudyConfig

# The assumed throughputs were measured on the offline default (SmolLM2-135M, d_in 576, expansion 4); the estimate
# scales them to the real sizes. Before the model is loaded (the plan printed first) d_in is not known yet and the
# reference width stands in; once loaded, the study passes the real d_in and d_sae.
REFERENCE_D_IN, REFERENCE_D_SAE = 576, 2304
REFERENCE_SAE = REFERENCE_D_IN * REFERENCE_D_SAE  # d_in * d_sae at which ``sae_tokens_per_s`` holds
DEFAULT_D_IN = REFERENCE_D_IN
PROMPT_TOKENS = 40          # typical length of a chat-rendered prompt
N_GENERATION_PROMPTS = 2  # steered generations when generation_prompts is empty: the first prompts of set B


@dataclass(frozen=True)
class Throughput:
    """Rates used by the estimate; tokens per second unless the name says otherwise."""

    truncated_tokens_per_s: float = 12_000.0  # incl. tokenisation
    full_tokens_per_s: float = 570.0          # ~1.8 s per 1024 tokens (SmolLM2-135M, 2 cores)
    sae_tokens_per_s: float = 8_000.0         # at d_in * d_sae = REFERENCE_SAE, batch 4096
    generate_seconds_per_token: float = 0.12  # one full forward on a chat prompt (no KV cache)
    load_seconds: float = 15.0
    run_overhead_seconds: float = 2.0         # per SAE training run: first buffer, scale estimate, saving
    hungarian_seconds_at_reference: float = 0.5  # one REFERENCE_D_SAE x REFERENCE_D_SAE assignment
    source: str = "assumed (SmolLM2-135M on 2 CPU cores)"

    def sae_rate(self, d_in: int, d_sae: int) -> float:
        return self.sae_tokens_per_s * REFERENCE_SAE / max(1, d_in * d_sae)


ASSUMED = Throughput()


@dataclass
class Stage:
    """One stage of the study: ``tokens`` maps a kind of work (``truncated``, ``full``, ``sae``, ``generated``)
    to its token count; ``runs`` counts SAE trainings; ``seconds`` is the estimate."""

    name: str
    what: str
    tokens: dict[str, int] = field(default_factory=dict)
    runs: int = 0
    seconds: float = 0.0


def d_sae_of(cfg: StudyConfig, d_in: int) -> int:
    return cfg.d_sae or cfg.expansion_factor * d_in


def cache_tokens_per_domain(cfg: StudyConfig) -> int:
    """Training tokens cached per domain: enough for the largest single consumer of that domain's data."""
    n = len(cfg.domains)
    return max(cfg.scratch_tokens, math.ceil(cfg.general_tokens / n), cfg.finetune_tokens, max(cfg.budgets))


def heldout_tokens_per_domain(cfg: StudyConfig) -> int:
    return max(cfg.recon_tokens, cfg.eval_tokens, cfg.steering_tokens)


def n_overlap_pairs(n_domains: int) -> int:
    """(general, control) + (general, each scratch) + (scratch, scratch) pairs + (general, each fine-tune)."""
    return 1 + n_domains + n_domains * (n_domains - 1) // 2 + n_domains


def study_plan(cfg: StudyConfig, rates: Optional[Throughput] = None, d_in: Optional[int] = None) -> list[Stage]:
    """The stages of :func:`domain_sae.study.run.run_study` with token counts and estimated seconds."""
    r = rates or ASSUMED
    d_in = d_in or DEFAULT_D_IN
    d_sae = d_sae_of(cfg, d_in)
    n = len(cfg.domains)
    n_saes = len(cfg.sae_names())
    sae_rate = r.sae_rate(d_in, d_sae)
    n_dirs = 4  # steering: the domain latent of the scratch and of the fine-tuned SAE, difference of means, random
    n_strengths = len(cfg.steering_strengths)

    stages = [Stage("load", f"load {cfg.model}, resolve {cfg.hook}", seconds=r.load_seconds)]

    cached, held = cache_tokens_per_domain(cfg), heldout_tokens_per_domain(cfg)
    tr = n * (cached + held)
    stages.append(Stage("caches", f"one truncated model pass per domain: {cached:,} training + {held:,} held-out "
                                  f"tokens for each of {n} domains", {"truncated": tr},
                        seconds=tr / r.truncated_tokens_per_s + 2.0 * n))

    train_tokens = 2 * cfg.general_tokens + n * cfg.scratch_tokens + n * cfg.finetune_tokens
    runs = 2 + 2 * n
    stages.append(Stage("train", f"{runs} SAEs (d_sae {d_sae:,}) from the caches: general + seed control, "
                                 f"{n} from scratch, {n} fine-tuned", {"sae": train_tokens}, runs,
                        train_tokens / sae_rate + runs * r.run_overhead_seconds))

    sets = n + 1
    full = sets * cfg.eval_tokens * (n_saes + 2)  # clean + zero-ablation + one spliced pass per SAE
    stages.append(Stage("matrix", f"{n_saes} SAEs x {sets} held-out sets ({cfg.eval_tokens:,} tokens each): CE/KL "
                                  f"with full model passes", {"full": full, "truncated": sets * cfg.eval_tokens},
                        seconds=full / r.full_tokens_per_s + sets * cfg.eval_tokens / r.truncated_tokens_per_s))

    budget_tokens = 2 * n * sum(cfg.budgets)
    b_runs = 2 * n * len(cfg.budgets)
    stages.append(Stage("budgets", f"token efficiency: scratch and fine-tuned at {cfg.budgets} tokens on each "
                                   f"domain", {"sae": budget_tokens}, b_runs,
                        budget_tokens / sae_rate + b_runs * r.run_overhead_seconds))

    pairs = n_overlap_pairs(n)
    stages.append(Stage("overlap", f"{pairs} dictionary pairs: max-cosine both ways, Hungarian matching; drift; "
                                   f"domain-specific latents",
                        seconds=pairs * r.hungarian_seconds_at_reference * (d_sae / REFERENCE_D_SAE) ** 3 + 5.0))

    prompt_tokens = 2 * cfg.n_prompts * PROMPT_TOKENS
    stages.append(Stage("directions", f"difference of means of {cfg.n_prompts} + {cfg.n_prompts} prompts; capture "
                                      f"by {n_saes} SAEs (top-k LS, OMP, k = 1..64)", {"truncated": prompt_tokens},
                        seconds=prompt_tokens / r.truncated_tokens_per_s + 0.3 * n_saes + 2.0))

    passes = 1 + n_dirs * n_strengths + (n_dirs - 1)  # clean, added at each strength, ablated (not random)
    steer_full = n * cfg.steering_tokens * passes
    generated = (len(cfg.generation_prompts) or N_GENERATION_PROMPTS) * (1 + n_dirs * n_strengths) * cfg.generate_tokens
    stages.append(Stage("steering", f"{n_dirs} directions x {n_strengths} strengths: CE change on {n} domains "
                                    f"({cfg.steering_tokens:,} tokens each) and greedy generations",
                        {"full": steer_full, "generated": generated},
                        seconds=steer_full / r.full_tokens_per_s + generated * r.generate_seconds_per_token))
    stages.append(Stage("report", "results.json, report.md, report.html (plots)", seconds=10.0))
    return stages


def estimate_minutes(cfg: StudyConfig, rates: Optional[Throughput] = None, d_in: Optional[int] = None) -> float:
    """Estimated wall-clock minutes of the whole study (sum of :func:`study_plan`)."""
    return sum(s.seconds for s in study_plan(cfg, rates, d_in)) / 60.0


def format_plan(stages: list[Stage], rates: Throughput = ASSUMED) -> str:
    """The plan as printed before the study starts."""
    lines = [f"Study plan (throughputs {rates.source}):"]
    for s in stages:
        toks = ", ".join(f"{v:,} {k}" for k, v in s.tokens.items() if v)
        lines.append(f"  {s.name:<10} ~{_duration(s.seconds):>7}  {s.what}" + (f" [{toks} tokens]" if toks else ""))
    lines.append(f"  {'total':<10} ~{_duration(sum(s.seconds for s in stages)):>7}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def refine(rates: Throughput, stage: Stage | str, seconds: float, tokens: dict[str, int], *, runs: int = 0,
           d_in: int = DEFAULT_D_IN, d_sae: int = 4 * DEFAULT_D_IN) -> Throughput:
    """Rates updated from a finished stage's real work (robust to a busy machine, unlike a short probe):

    - ``caches``: truncated rate = tokens / seconds (tokenisation included);
    - ``train``/``budgets``: SAE rate = tokens / (seconds - runs * run_overhead), at this SAE's size;
    - ``matrix``: full-forward rate = full tokens / seconds (its other work is minor); the time per generated
      token is scaled by the same factor.

    Rates not yet measured keep their assumed values.
    """
    name = stage.name if isinstance(stage, Stage) else stage
    seconds = max(float(seconds), 1e-3)
    if name == "caches" and tokens.get("truncated"):
        return replace(rates, truncated_tokens_per_s=tokens["truncated"] / seconds, source=_partly(rates))
    if name in ("train", "budgets") and tokens.get("sae"):
        work = max(seconds - runs * rates.run_overhead_seconds, 0.25 * seconds)
        return replace(rates, sae_tokens_per_s=tokens["sae"] / work * d_in * d_sae / REFERENCE_SAE,
                       source=_partly(rates))
    if name == "matrix" and tokens.get("full"):
        full = tokens["full"] / seconds
        return replace(rates, full_tokens_per_s=full, source=_partly(rates),
                       generate_seconds_per_token=rates.generate_seconds_per_token * rates.full_tokens_per_s / full)
    return rates


def _partly(rates: Throughput) -> str:
    return "partly measured on this machine"


def remaining_seconds(cfg: StudyConfig, rates: Throughput, done: set[str], d_in: Optional[int] = None) -> float:
    """Estimated seconds of the stages not in ``done``."""
    return sum(s.seconds for s in study_plan(cfg, rates, d_in) if s.name not in done)
