"""Options of the domain-adaptation study (`dsae compare CONFIG`, `dsae demo`).

One study trains, from activation caches built in one model pass per domain:

- ``general``: on the mixture of all domains (each batch split evenly between them), seed ``seed``;
- ``general (seed 2)``: the same with ``control_seed`` (the seed-to-seed yardstick);
- ``<domain> scratch``: on one domain from scratch, for every domain;
- ``general→<domain>``: the general SAE fine-tuned on one domain, for every domain;
- the token-efficiency ladder: scratch and fine-tuned SAEs at each of ``budgets`` tokens, per domain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import ConfigError, check_finite_floats, from_dict, load_config_file, opt
from ..outdirs import OutputDirError, safe_component

GENERAL = "general"
CONTROL = "general (seed 2)"


def scratch_name(domain: str) -> str:
    return f"{domain} scratch"


def finetuned_name(domain: str) -> str:
    return f"{GENERAL}→{domain}"


@dataclass
class StudyConfig:
    """One study: SAEs {general, <domain> scratch, general→<domain>} + a seed-control general SAE."""

    model: str = opt("smollm2-135m-instruct", "Language model (as for dsae train).", group="model")
    hook: str = opt("blocks.0.hook_mlp_out", "Hook point.", group="model")
    device: str = opt("auto", "Device.", group="model")
    domains: dict = opt({"chat": "chat", "code": "code"},
                        "Domains: name -> data spec (as for dsae train --data). The general SAE trains on their "
                        "mixture (equal shares of every batch).", group="data")
    context_size: int = opt(256, "Tokens per sequence.", group="data")
    holdout_fraction: float = opt(0.05, "Held-out fraction of each domain (by content hash).", group="data")

    expansion_factor: int = opt(4, "d_sae = expansion_factor * d_in (unless d_sae is set).", group="sae")
    d_sae: Optional[int] = opt(None, "Number of latents of every SAE; overrides expansion_factor.", group="sae")
    train_batch_size_tokens: int = opt(4096, "Tokens per optimizer step.", group="training")
    buffer_size_tokens: int = opt(65536, "Shuffle buffer (tokens).", group="training")
    lr: float = opt(2e-3, "Learning rate of SAEs trained from scratch.", group="training")
    finetune_lr: float = opt(1e-3, "Learning rate when fine-tuning the general SAE (fresh optimizer, 5% warm-up).",
                             group="training")
    l1_coefficient: float = opt(5.0, "Sparsity coefficient (all SAEs).", group="training")
    general_tokens: int = opt(400_000, "Training tokens of the general SAE (equal shares of every domain) and of "
                              "its seed control.", group="budget")
    scratch_tokens: int = opt(400_000, "Training tokens of each domain SAE trained from scratch.", group="budget")
    finetune_tokens: int = opt(100_000, "Tokens of each fine-tuning of the general SAE.", group="budget")
    budgets: list[int] = opt([25_000, 50_000, 100_000, 200_000], "Token budgets of the token-efficiency curves "
                             "(fine-tuned vs scratch at each budget, per domain).", group="budget")
    seed: int = opt(42, "Seed of every SAE.", group="training")
    control_seed: int = opt(43, "Seed of the seed-control general SAE (the yardstick for differences).",
                            group="training")

    eval_tokens: int = opt(4096, "Held-out tokens per eval set for language-model metrics (CE/KL, full model "
                           "passes).", group="eval")
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
    generate_tokens: int = opt(20, "Greedy tokens per steered generation.", group="analysis")
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
