"""Options of the domain-adaptation study (`dsae compare CONFIG`, `dsae demo`).

One study trains, from activation caches built in one model pass per domain:

- ``general``: on the mixture of all domains (each batch split evenly between them), seed ``seed``;
- ``general (seed 2)``: the same with ``control_seed`` (the seed-to-seed yardstick);
- ``<domain> scratch``: on one domain from scratch, for every domain;
- ``general→<domain>``: the general SAE fine-tuned on one domain, for every domain;
- the token-efficiency ladder: scratch and fine-tuned SAEs at each of ``budgets`` tokens, per domain.

Options that mean the same as in `dsae train` / `dsae eval` (model, hook, lr, batch sizes, ...) are declared there
and taken over here with :func:`inherit` (same default, same help); only the study's own options
are declared in :class:`StudyConfig`. The schedule every study SAE trains with is :func:`study_schedule`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from ..config import ConfigError, EvalConfig, TrainConfig, check_finite_floats, from_dict, load_config_file, opt
from ..util.outdirs import OutputDirError, safe_component

GENERAL = "general"
CONTROL = "general (seed 2)"


def inherit(cls: type, name: str):
    """A field with the default and documentation of ``cls``'s option ``name`` (each option documented once)."""
    f = cls.__dataclass_fields__[name]
    if f.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=f.default_factory, metadata=f.metadata)
    return dataclasses.field(default=f.default, metadata=f.metadata)


def scratch_name(domain: str) -> str:
    return f"{domain} scratch"


def finetuned_name(domain: str) -> str:
    return f"{GENERAL}→{domain}"


@dataclass
class StudyConfig:
    """One study: SAEs {general, <domain> scratch, general→<domain>} + a seed-control general SAE."""

    # Options shared with `dsae train` / `dsae eval`: default and help come from TrainConfig / EvalConfig.
    model: str = inherit(TrainConfig, "model")
    hook: str = inherit(TrainConfig, "hook")
    device: str = inherit(TrainConfig, "device")
    domains: dict = opt({"chat": "chat", "code": "code"},
                        "Domains: name -> data spec (as for dsae train --data). The general SAE trains on their "
                        "mixture (equal shares of every batch).", group="data")
    context_size: int = inherit(TrainConfig, "context_size")
    holdout_fraction: float = inherit(TrainConfig, "holdout_fraction")

    expansion_factor: int = inherit(TrainConfig, "expansion_factor")
    d_sae: Optional[int] = inherit(TrainConfig, "d_sae")
    train_batch_size_tokens: int = inherit(TrainConfig, "train_batch_size_tokens")
    buffer_size_tokens: int = inherit(TrainConfig, "buffer_size_tokens")
    lr: float = inherit(TrainConfig, "lr")
    finetune_lr: float = opt(1e-3, "Learning rate when fine-tuning the general SAE (fresh optimizer; the "
                             "schedule of every SAE is given by study_schedule).", group="training")
    l1_coefficient: float = inherit(TrainConfig, "l1_coefficient")
    architecture: str = inherit(TrainConfig, "architecture")
    k: int = inherit(TrainConfig, "k")
    general_tokens: int = opt(400_000, "Training tokens of the general SAE (equal shares of every domain) and of "
                              "its seed control.", group="budget")
    scratch_tokens: int = opt(400_000, "Training tokens of each domain SAE trained from scratch.", group="budget")
    finetune_tokens: int = opt(100_000, "Tokens of each fine-tuning of the general SAE.", group="budget")
    budgets: list[int] = opt([25_000, 50_000, 100_000, 200_000], "Token budgets of the token-efficiency curves "
                             "(fine-tuned vs scratch at each budget, per domain).", group="budget")
    seed: int = inherit(TrainConfig, "seed")
    control_seed: int = opt(43, "Seed of the seed-control general SAE (the yardstick for differences).",
                            group="training")

    eval_tokens: int = inherit(EvalConfig, "eval_tokens")
    recon_tokens: int = opt(16384, "Held-out tokens per domain for reconstruction metrics and the token-efficiency "
                            "curves (truncated model pass only).", group="eval")
    match_threshold: float = opt(0.7, "Decoder cosine at or above which two latents count as the same.",
                                 group="analysis")
    n_prompts: int = opt(48, "Prompts per set for the direction analysis.", group="analysis")
    prompts_a: Optional[str] = opt(None, "File of prompts (one per line), set A; default: code requests built from "
                                   "standard-library docstrings.", group="analysis")
    prompts_b: Optional[str] = opt(None, "File of prompts, set B; default: small-talk openers from the chat "
                                   "corpus.", group="analysis")
    prompt_labels: list[str] = opt(["code requests", "small talk"], "Names of prompt sets A and B.",
                                   group="analysis")
    steer_domain: str = opt("code", "Domain whose scratch SAE provides the steering latent (the latent with the "
                            "largest A-minus-B mean activation).", group="analysis")
    steering_strengths: list[float] = opt([0.25, 0.5, 1.0], "Steering strengths, in units of the mean activation "
                                          "norm at the hook.", group="analysis")
    steering_tokens: int = opt(2048, "Held-out tokens per domain for the steering CE change.", group="analysis")
    generation_prompts: list[str] = opt([], "Prompts of the steered greedy generations; default: the first two "
                                        "prompts of set B.", group="analysis")
    generate_tokens: int = opt(20, "Greedy tokens per steered generation.", group="analysis")
    feature_tokens: int = opt(4096, "Held-out tokens per domain for the feature store of the main SAEs (browse it "
                              "with `dsae dashboard OUT/features.sqlite`); 0 skips the store.", group="analysis")
    output_dir: str = opt("demo_out/full", "Where the study writes its report.", group="output")

    @property
    def domain_names(self) -> list[str]:
        return list(self.domains)

    def sae_names(self) -> list[str]:
        """The main SAEs, in report order."""
        return ([GENERAL, CONTROL] + [scratch_name(d) for d in self.domains]
                + [finetuned_name(d) for d in self.domains])

    def validate(self) -> "StudyConfig":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(isinstance(self.domains, dict) and len(self.domains) >= 2,
             f"domains must map at least two names to data specs, e.g. {{chat: chat, code: code}}; got "
             f"{self.domains!r}.")
        for name, spec in self.domains.items():
            need(isinstance(name, str) and name.strip() and isinstance(spec, str) and spec.strip(),
                 f"domains: {name!r}: {spec!r} must be a name and a data spec (both strings).")
            need(name != GENERAL and "→" not in name and "|" not in name,
                 f"domains: the name {name!r} is reserved or contains '→'/'|'; pick another name.")
            try:  # domain names become cache and run directory names
                safe_component(name, "The domain name")
            except OutputDirError as e:
                raise ConfigError(f"domains: {e}") from None
        check_finite_floats(self)
        need(self.steer_domain in self.domains,
             f"steer_domain {self.steer_domain!r} is not one of the domains {list(self.domains)}.")
        b = self.train_batch_size_tokens
        need(b > 0 and self.context_size >= 2, "train_batch_size_tokens must be > 0 and context_size >= 2.")
        need(b >= len(self.domains),
             f"train_batch_size_tokens ({b}) is too small to split between {len(self.domains)} domains.")
        for name in ("general_tokens", "scratch_tokens", "finetune_tokens"):
            need(getattr(self, name) >= b, f"{name} ({getattr(self, name)}) is smaller than one batch ({b} tokens).")
        need(len(self.budgets) > 0 and all(x >= b for x in self.budgets),
             f"budgets must be non-empty and each hold at least one batch ({b} tokens); got {self.budgets}.")
        need(self.buffer_size_tokens >= b, "buffer_size_tokens must be at least train_batch_size_tokens.")
        need(self.seed != self.control_seed,
             "control_seed must differ from seed (the pair measures the seed-to-seed spread).")
        need(self.d_sae is None or self.d_sae > 0, f"d_sae must be positive (got {self.d_sae}).")
        need(self.expansion_factor > 0, "expansion_factor must be positive.")
        for name in ("eval_tokens", "recon_tokens", "steering_tokens"):
            need(getattr(self, name) >= 2, f"{name} must be at least 2 tokens.")
        need(self.lr > 0 and self.finetune_lr > 0 and self.l1_coefficient >= 0,
             "lr and finetune_lr must be > 0 and l1_coefficient >= 0.")
        need(0 < self.match_threshold <= 1, "match_threshold must be in (0, 1].")
        need(self.n_prompts >= 2, "n_prompts must be at least 2 (a mean needs samples).")
        need(len(self.prompt_labels) == 2, f"prompt_labels needs two names (set A, set B); got {self.prompt_labels}.")
        need(len(self.steering_strengths) > 0, "steering_strengths must list at least one strength.")
        need(self.generate_tokens >= 0, "generate_tokens must be >= 0.")
        return self


def load_study_config(path: Optional[str] = None, overrides: Optional[dict] = None) -> StudyConfig:
    """defaults < file (YAML/TOML) < overrides; validated."""
    values = load_config_file(path) if path else {}
    values.update(overrides or {})
    return from_dict(StudyConfig, values, source=str(path or "study options")).validate()


# The schedule of every SAE of the study, in parts of its ``steps = tokens // train_batch_size_tokens`` (runs of
# very different lengths -- the budget ladder -- get the same shape of schedule).
LR_WARM_UP_PARTS = 20     # lr_warm_up_steps = steps // 20   (the first 5%)
LR_DECAY_PARTS = 5        # lr_decay_steps   = steps // 5    (the last 20%)
L1_WARM_UP_PARTS = 20     # l1_warm_up_steps = steps // 20
SPARSITY_WINDOW_PARTS = 4  # feature_sampling_window = dead_feature_window = max(10, steps // 4)
LOGS_PER_RUN = 10         # log_every = max(1, steps // 10)


def study_schedule(steps: int) -> dict[str, int]:
    """TrainConfig schedule options of one study SAE of ``steps`` optimizer steps: linear LR warm-up over the first
    5% and linear decay over the last 20%, L1 warm-up over the first 5%, sparsity windows of a quarter of the run
    (at least 10 steps), ten log lines per run."""
    window = max(10, steps // SPARSITY_WINDOW_PARTS)
    return {"lr_warm_up_steps": steps // LR_WARM_UP_PARTS, "lr_decay_steps": steps // LR_DECAY_PARTS,
            "l1_warm_up_steps": steps // L1_WARM_UP_PARTS, "feature_sampling_window": window,
            "dead_feature_window": window, "log_every": max(1, steps // LOGS_PER_RUN)}
