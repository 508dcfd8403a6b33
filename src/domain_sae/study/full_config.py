"""Options of the rigorous study (`dsae compare configs/study_full.yaml`): the study's options plus the ladders that
make its comparisons matched and its differences measurable.

Per hook in ``hooks`` (one config, several depths), with S = ``seeds``, L = the sparsity ladder (``l1_ladder`` for
ReLU + L1 and JumpReLU SAEs, ``k_ladder`` for the TopK family: ``architecture`` topk or batchtopk), D = the domains
and B = ``budget_ladder``, the study trains from activation caches:

- ``general``: on the general mixture ``general_mix`` (exact token shares of every batch), S x L SAEs;
- ``<domain> scratch``: S x L per domain, ``scratch_tokens`` each (the reference a domain SAE reaches);
- ``general→<domain> @ b``: the general SAE of the same seed and sparsity fine-tuned on b tokens, S x L x B;
- ``<domain> scratch @ b``: from scratch on b tokens (the token-matched baseline), S x L x B;
- ``general+residual→<domain>``: the frozen general SAE plus a ``residual_d_sae``-latent SAE trained on the domain's
  reconstruction error (one per seed, at ``residual_sparsity``).

Every comparison is made at matched L0: each condition's sparsity ladder gives one EV-vs-L0 and CE-score-vs-L0
frontier per seed, interpolated in log L0 inside the L0 range all compared frontiers cover
(:mod:`domain_sae.analysis.stats`). With TopK SAEs the L0 of every run is its k, so conditions are compared at
exactly the same k (the interpolation is then the identity at the ladder's k values).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from ..config import ConfigError, from_dict, load_config_file, opt
from ..data.mixture import GENERAL_MIXTURE
from .config import StudyConfig

__all__ = ["FullStudyConfig", "load_full_config", "is_full_config", "STUDY_ARCHITECTURES", "K_ARCHITECTURES"]

K_ARCHITECTURES = ("topk", "batchtopk")               # sparsity set by k: every condition compared at the same k
STUDY_ARCHITECTURES = ("standard", "jumprelu") + K_ARCHITECTURES

FULL_ONLY = ("hooks", "seeds", "l1_ladder", "k_ladder", "budget_ladder", "general_mix", "residual_d_sae",
             "residual_tokens", "probe_tokens", "probe_ks", "ce_blocks", "n_l0_grid", "ce_for_budgets")


@dataclass
class FullStudyConfig(StudyConfig):
    """The rigorous study: ladders of seeds, L1 coefficients and budgets at every hook of ``hooks``."""

    hooks: list[str] = opt(["blocks.0.hook_mlp_out", "blocks.15.hook_resid_post"],
                           "Hook points studied, each a complete study (layer 0 and a mid layer of SmolLM2).",
                           group="model")
    seeds: list[int] = opt([42, 43, 44], "Seeds of every condition (at least 2; 3 or more for error bars).",
                           group="training")
    l1_ladder: list[float] = opt([2.0, 5.0, 12.0], "L1 coefficients of every condition: one frontier point each "
                                 "(at least 2, so metrics can be compared at matched L0); architectures standard "
                                 "and jumprelu.", group="training")
    k_ladder: list[int] = opt([16, 32, 64], "k of every condition when architecture is topk or batchtopk: one "
                              "frontier point each, every condition at the same k (at least 2).", group="training")
    budget_ladder: list[int] = opt([10_000, 30_000, 100_000, 300_000, 1_000_000],
                                   "Fine-tuning budgets of the gap-closed curve (and of the token-matched scratch "
                                   "SAEs), log-spaced.", group="budget")
    general_mix: dict = opt(dict(GENERAL_MIXTURE), "The general corpus: data spec or domain name -> weight "
                            "(fraction of every training batch's tokens).", group="data")
    residual_d_sae: int = opt(256, "Latents of the residual SAE trained on the general SAE's reconstruction error "
                              "(baseline).", group="baselines")
    residual_tokens: int = opt(200_000, "Training tokens of each residual SAE.", group="baselines")
    probe_tokens: int = opt(8192, "Labelled held-out tokens per probing domain (code token types, chat turns).",
                            group="analysis")
    probe_ks: list[int] = opt([1, 2, 5, 20], "k of the k-sparse probes.", group="analysis")
    ce_blocks: int = opt(4, "Blocks the CE evaluation tokens are split into for the per-document jackknife error "
                         "of the CE-loss score (at least 2).", group="eval")
    ce_for_budgets: bool = opt(True, "Measure the CE-loss score (full model passes) of every budget SAE, for the "
                               "CE gap-closed curve; off: the CE of the headline budget (finetune_tokens) only, EV "
                               "for the whole ladder.", group="eval")
    n_l0_grid: int = opt(3, "Matched L0 values (log-spaced over the common range) in the report's tables.",
                         group="analysis")

    def general_specs(self) -> dict[str, str]:
        """name -> data spec of every general-mixture part (a domain name maps to the domain's spec)."""
        return {name: self.domains.get(name, name) for name in self.general_mix}

    def corpora(self) -> dict[str, str]:
        """Every corpus that gets a cache: the domains, then the general-only parts (e.g. prose)."""
        out = dict(self.domains)
        for name, spec in self.general_specs().items():
            out.setdefault(name, spec)
        return out

    @property
    def sparsity_knob(self) -> str:
        """What the sparsity ladder varies: ``k`` (TopK family) or ``l1`` (the L1 / sparsity coefficient)."""
        return "k" if self.architecture in K_ARCHITECTURES else "l1"

    @property
    def knob_label(self) -> str:
        return "k" if self.sparsity_knob == "k" else "L1"

    @property
    def sparsity_ladder(self) -> list[float]:
        return list(self.k_ladder) if self.sparsity_knob == "k" else list(self.l1_ladder)

    @property
    def middle_sparsity(self) -> float:
        """The sparsity of single-point analyses (residual SAEs, probing, overlap): the ladder's median."""
        ladder = sorted(self.sparsity_ladder)
        return ladder[len(ladder) // 2]

    @property
    def residual_sparsity(self) -> float:
        """The sparsity of the residual baseline (its general parent and the residual SAE both): the ladder's
        middle L1 coefficient; for the TopK family the smallest k, so that the stack's L0 (2 k) stays inside the
        ladder's L0 range when the ladder spans a factor 2 or more."""
        return min(self.sparsity_ladder) if self.sparsity_knob == "k" else self.middle_sparsity

    def with_sparsity(self, x: float, **changes: Any) -> "FullStudyConfig":
        """This config with the ladder's knob set to ``x`` (``k`` or ``l1_coefficient``) and ``changes``."""
        knob = {"k": int(x)} if self.sparsity_knob == "k" else {"l1_coefficient": float(x)}
        return dataclasses.replace(self, **knob, **changes)

    def wants_ce(self, run: Any) -> bool:
        """Whether ``run`` (a RunSpec) gets a CE-loss score: always, except off-headline budgets when
        ``ce_for_budgets`` is off."""
        return self.ce_for_budgets or run.budget is None or run.budget == self.headline_budget

    @property
    def headline_budget(self) -> int:
        """The fine-tuning budget of the main table: ``finetune_tokens`` if on the ladder, else the closest in log."""
        return min(self.budget_ladder, key=lambda b: abs(math.log(b) - math.log(self.finetune_tokens)))

    def validate(self) -> "FullStudyConfig":
        super().validate()

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(len(self.hooks) >= 1 and all(isinstance(h, str) and h for h in self.hooks),
             f"hooks must list at least one hook name; got {self.hooks!r}.")
        need(len(set(self.seeds)) == len(self.seeds) >= 2, f"seeds must hold at least 2 distinct seeds (3 or more for "
             f"error bars); got {self.seeds}.")
        need(self.architecture in STUDY_ARCHITECTURES, f"the rigorous study trains architecture "
             f"{' | '.join(STUDY_ARCHITECTURES)}; got {self.architecture!r}.")
        if self.sparsity_knob == "k":
            need(len(set(self.k_ladder)) == len(self.k_ladder) >= 2
                 and all(isinstance(k, int) and 0 < k for k in self.k_ladder),
                 f"k_ladder needs at least 2 distinct positive integers (one frontier point each); got "
                 f"{self.k_ladder}.")
        else:
            need(len(set(self.l1_ladder)) == len(self.l1_ladder) >= 2 and all(x > 0 for x in self.l1_ladder),
                 f"l1_ladder needs at least 2 distinct positive coefficients (one frontier point each); got "
                 f"{self.l1_ladder}.")
        b = self.train_batch_size_tokens
        need(len(self.budget_ladder) >= 2 and self.budget_ladder == sorted(set(self.budget_ladder))
             and self.budget_ladder[0] >= b,
             f"budget_ladder must be increasing, hold at least 2 budgets and start at one batch ({b}) or more; got "
             f"{self.budget_ladder}.")
        need(isinstance(self.general_mix, dict) and self.general_mix
             and all(isinstance(w, (int, float)) and w > 0 for w in self.general_mix.values()),
             f"general_mix maps data specs (or domain names) to positive weights; got {self.general_mix!r}.")
        need(b >= len(self.general_mix), f"train_batch_size_tokens ({b}) is too small to split between "
                                         f"{len(self.general_mix)} general-mixture parts.")
        need(self.residual_d_sae > 0 and self.residual_tokens >= b, "residual_d_sae must be > 0 and residual_tokens "
                                                                    "at least one batch.")
        need(self.probe_tokens >= 64 and all(k >= 1 for k in self.probe_ks) and self.probe_ks,
             "probe_tokens must be >= 64 and probe_ks positive.")
        need(self.ce_blocks >= 2, "ce_blocks must be at least 2 (a jackknife needs two blocks).")
        need(self.n_l0_grid >= 1, "n_l0_grid must be at least 1.")
        return self


def is_full_config(values: dict) -> bool:
    """A config file asks for the rigorous study when it sets any of its own options."""
    return any(k in values for k in FULL_ONLY)


def load_full_config(path: Optional[str] = None, overrides: Optional[dict] = None) -> FullStudyConfig:
    """defaults < file (YAML/TOML) < overrides; validated."""
    values = load_config_file(path) if path else {}
    values.update(overrides or {})
    return from_dict(FullStudyConfig, values, source=str(path or "study options")).validate()
