"""Options of the domain-adaptation study (`dsae compare CONFIG`, `dsae demo`): one :class:`StudyConfig` for the
demo (``configs/study_demo.yaml``, one hook, one seed plus a seed control, one sparsity value) and the rigorous
study (``configs/study_full.yaml``, two hooks, three seeds, a sparsity ladder).

At every hook of ``hooks`` the study trains, from activation caches, the runs of the conditions listed in
``conditions`` (:mod:`.runs`; S = ``seeds``, L = ``sparsity``, D = the domains, B = ``budgets``):

- ``general``: on the general mixture (``general_mix``: exact token shares of every batch), S x L (plus one run per
  sparsity at ``control_seed``, the seed-to-seed yardstick of a one-seed study);
- ``scratch``: each domain from scratch on ``scratch_tokens``, S x L x D;
- ``finetune``: the general SAE of the same seed and sparsity fine-tuned on b domain tokens, S x L x D x B;
- ``finetune_kl``: the same with the end-to-end objective (KL of next-token distributions, SAE spliced in; it
  trains from the model, not the caches);
- ``scratch_budget``: a domain SAE from scratch on b tokens (the token-matched baseline), S x L x D x B;
- ``scratch_total``: a domain SAE from scratch on as many tokens in all as the fine-tuned one has seen
  (``general_tokens + b``; equal total tokens), S x L x D x B;
- ``continue``: the general SAE trained on b more general tokens (does more training alone close the gap?);
- ``residual``: the frozen general SAE plus a ``residual_d_sae``-latent SAE on the domain's reconstruction error.

Options that mean the same as in `dsae train` / `dsae eval` are taken over from there with :func:`inherit` (same
default, same help). Every SAE trains with :func:`study_schedule`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Optional

from ..config import (ConfigError, DataConfig, EvalConfig, TrainConfig, check_finite_floats, from_dict,
                      load_config_file, opt)
from ..errors import UserError
from ..util.outdirs import OutputDirError, safe_component

GENERAL = "general"
K_ARCHITECTURES = ("topk", "batchtopk")               # sparsity set by k: every condition at the same k
STUDY_ARCHITECTURES = ("standard", "jumprelu") + K_ARCHITECTURES
CONDITIONS = ("general", "scratch", "finetune", "finetune_kl", "scratch_budget", "scratch_total", "continue",
              "residual")
ANALYSES = ("matrix", "overlap", "probing", "directions", "steering", "features", "convergence")


class StudyError(UserError):
    """The study cannot go on (e.g. a domain has no held-out data); the message says what to change."""


def slug(name: str) -> str:
    """A directory or file name for a hook or corpus name (``blocks.0.hook_mlp_out`` stays as it is)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "x"


def inherit(cls: type, name: str):
    """A field with the default and documentation of ``cls``'s option ``name`` (each option documented once)."""
    f = cls.__dataclass_fields__[name]
    if f.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=f.default_factory, metadata=f.metadata)
    return dataclasses.field(default=f.default, metadata=f.metadata)


@dataclass
class StudyConfig:
    """One study: the conditions of :data:`CONDITIONS` at every hook, measured and analysed (module docstring)."""

    model: str = inherit(TrainConfig, "model")
    hooks: list[str] = opt(["blocks.0.hook_mlp_out"], "Hook points studied, each a complete study (one model pass "
                           "per corpus caches them all).", group="model")
    device: str = inherit(TrainConfig, "device")
    domains: dict = opt({"chat": "chat", "code": "code"}, "Domains: name -> data spec (as for dsae train --data).",
                        group="data")
    general_mix: dict = opt({}, "The general corpus: domain name or data spec -> weight (token share of every "
                            "general training batch); empty: equal shares of the domains.", group="data")
    context_size: int = inherit(TrainConfig, "context_size")
    holdout_fraction: float = inherit(TrainConfig, "holdout_fraction")
    heldout_tokens_per_document: Optional[int] = inherit(DataConfig, "heldout_tokens_per_document")

    architecture: str = opt("standard", "SAE architecture of every study SAE: standard or jumprelu (the sparsity "
                            "ladder holds L1 coefficients), topk or batchtopk (it holds k).", group="sae")
    expansion_factor: int = inherit(TrainConfig, "expansion_factor")
    d_sae: Optional[int] = inherit(TrainConfig, "d_sae")
    sparsity: list[float] = opt([5.0], "The sparsity ladder, one run of every condition per value: L1 coefficients "
                                "(architectures standard, jumprelu) or k (topk, batchtopk). Two or more values: "
                                "conditions are compared at matched L0 (log-L0 interpolation, never extrapolated); "
                                "one value: at that value (each SAE's own L0 is reported).", group="sae")
    train_batch_size_tokens: int = inherit(TrainConfig, "train_batch_size_tokens")
    buffer_size_tokens: int = inherit(TrainConfig, "buffer_size_tokens")
    lr: float = inherit(TrainConfig, "lr")
    finetune_lr: float = opt(1e-3, "Learning rate when training on from a parent SAE (finetune, continue); fresh "
                             "optimizer, schedule of study_schedule.", group="training")
    seeds: list[int] = opt([42], "Seeds of every condition (3 or more for error bars over seeds).",
                           group="training")
    control_seed: Optional[int] = opt(43, "An extra seed of the general condition alone: with one seed in seeds, "
                                      "the seed-to-seed yardstick; null: none.", group="training")

    conditions: list[str] = opt(["general", "scratch", "finetune", "scratch_budget"], "Conditions trained: "
                                + ", ".join(CONDITIONS) + " (module docstring of study/config.py).",
                                group="conditions")
    general_tokens: int = opt(400_000, "Training tokens of every general SAE (unless train_to_plateau).",
                              group="budget")
    scratch_tokens: int = opt(400_000, "Training tokens of every domain SAE trained from scratch (the reference; "
                              "unless train_to_plateau).", group="budget")
    train_to_plateau: bool = opt(False, "Train every general and scratch SAE until its held-out explained variance "
                                 "gains less than 0.005 per doubling of tokens, or one pass over its corpus's "
                                 "training split, or plateau_max_tokens, whichever comes first (checkpoints at "
                                 "doublings from plateau_first_tokens; constant learning rate after warm-up); "
                                 "general_tokens and scratch_tokens are then unused, and scratch_total and "
                                 "continue are sized by each general SAE's actual tokens.", group="budget")
    plateau_first_tokens: int = opt(32_768, "train_to_plateau: tokens at the first checkpoint (the next ones at "
                                    "doublings of it, plateau_per_doubling per doubling).", group="budget")
    plateau_max_tokens: int = opt(4_000_000, "train_to_plateau: the most tokens a general or scratch SAE trains on "
                                  "(a time cap; the report says when a run stopped there).", group="budget")
    plateau_per_doubling: int = opt(2, "train_to_plateau: checkpoints per doubling of tokens (each one's half is "
                                    "again a checkpoint).", group="budget")
    budgets: list[int] = opt([25_000, 100_000], "Budgets b of the per-budget conditions (finetune, scratch_budget, "
                             "scratch_total, continue), increasing; the gap-closed curve.", group="budget")
    kl_budgets: list[int] = opt([], "Budgets of the finetune_kl condition (a subset of budgets: it runs the model, "
                                "about 3 full passes per token); empty: every budget.", group="budget")
    headline_budget: Optional[int] = opt(None, "The budget of the main comparison (one of budgets); default the "
                                         "largest.", group="budget")
    residual_d_sae: int = opt(256, "Latents of each residual SAE (condition residual).", group="conditions")
    residual_tokens: int = opt(200_000, "Training tokens of each residual SAE.", group="conditions")

    eval_tokens: int = inherit(EvalConfig, "eval_tokens")
    recon_tokens: int = opt(16384, "Held-out tokens per set for explained variance and L0 (truncated model pass, "
                            "once per corpus).", group="eval")
    n_bootstrap: int = opt(200, "Bootstrap replicates over held-out documents for the standard errors of the "
                           "CE-loss score and the other model-pass metrics.", group="eval")
    ce_for_budgets: bool = opt(True, "Measure the CE-loss score of every per-budget run; off: of the headline "
                               "budget only (explained variance for the whole ladder).", group="eval")
    ce_general_every_budget: bool = opt(True, "Measure the CE-loss score of per-budget runs on the general set "
                                        "(forgetting) at every budget; off: at the headline budget only.",
                                        group="eval")
    n_paired_bootstrap: int = opt(2000, "Replicates of the paired bootstrap over held-out documents (and seeds) that "
                                  "calls every difference between two SAEs measured on the same documents.",
                                  group="eval")

    analyses: list[str] = opt(list(ANALYSES[:-1]), "Analyses of the trained and measured runs: matrix (every main "
                              "SAE on every held-out set), overlap (dictionaries, drift, domain-specific latents), "
                              "probing (k-sparse probes on labels the domain's data gives: chat turns, Python "
                              "token types), directions, steering, features (a feature store), convergence (EV "
                              "against tokens of the reference SAEs, seed-to-seed overlap).", group="analysis")
    match_threshold: float = opt(0.7, "Decoder cosine at or above which two latents count as the same.",
                                 group="analysis")
    n_l0_grid: int = opt(3, "Matched L0 values (log-spaced over the common range) in the report's tables.",
                         group="analysis")
    probe_tokens: int = opt(8192, "Labelled held-out tokens per probing domain.", group="analysis")
    probe_ks: list[int] = opt([1, 2, 5, 20], "k of the k-sparse probes.", group="analysis")
    n_prompts: int = opt(48, "Prompts per set for the direction analysis.", group="analysis")
    prompts_a: Optional[str] = opt(None, "File of prompts (one per line), set A; default: code requests built from "
                                   "standard-library docstrings.", group="analysis")
    prompts_b: Optional[str] = opt(None, "File of prompts, set B; default: first user turns of the first chat "
                                   "domain (else the built-in chat corpus).", group="analysis")
    prompt_labels: list[str] = opt(["code requests", "small talk"], "Names of prompt sets A and B.",
                                   group="analysis")
    steer_domain: Optional[str] = opt(None, "Domain whose SAEs provide the steering latents (largest domain-minus-"
                                      "other mean activation); default the last domain.", group="analysis")
    steering_strengths: list[float] = opt([0.25, 0.5, 1.0], "Steering strengths, in units of the mean activation "
                                          "norm at the hook.", group="analysis")
    steering_tokens: int = opt(2048, "Held-out tokens per domain for the steering CE change.", group="analysis")
    generation_prompts: list[str] = opt([], "Prompts of the steered greedy generations; default: the first two "
                                        "prompts of set B.", group="analysis")
    generate_tokens: int = opt(20, "Greedy tokens per steered generation.", group="analysis")
    feature_tokens: int = opt(4096, "Held-out tokens per domain for the feature store of the main SAEs (browse it "
                              "with dsae dashboard).", group="analysis")
    output_dir: str = opt("demo_out/full", "Where the study writes its report.", group="output")

    # -- derived ---------------------------------------------------------------------------------------------------
    def general_weights(self) -> dict[str, float]:
        """Part name -> weight of the general mixture (equal shares of the domains when ``general_mix`` is empty)."""
        return {k: float(v) for k, v in self.general_mix.items()} or {d: 1.0 for d in self.domains}

    def corpora(self) -> dict[str, str]:
        """Every corpus that gets a cache, name -> data spec: the domains, then the general-only parts."""
        out = dict(self.domains)
        for name in self.general_weights():
            out.setdefault(name, self.domains.get(name, name))
        return out

    @property
    def sparsity_knob(self) -> str:
        """What the sparsity ladder sets: ``k`` (TopK family) or ``l1`` (the L1 / sparsity coefficient)."""
        return "k" if self.architecture in K_ARCHITECTURES else "l1"

    @property
    def knob_label(self) -> str:
        return "k" if self.sparsity_knob == "k" else "L1"

    @property
    def middle_sparsity(self) -> float:
        """The sparsity of the single-point analyses (overlap, probing, matrix, steering): the ladder's median."""
        ladder = sorted(self.sparsity)
        return ladder[len(ladder) // 2]

    @property
    def residual_sparsity(self) -> float:
        """Sparsity of the residual baseline: the middle value; for the TopK family the smallest k, so that the
        stack's L0 (2 k) stays inside the ladder's L0 range when the ladder spans a factor 2 or more."""
        return min(self.sparsity) if self.sparsity_knob == "k" else self.middle_sparsity

    @property
    def headline(self) -> int:
        return self.headline_budget or max(self.budgets)

    def budgets_of(self, kind: str) -> list[int]:
        """The budgets a per-budget condition is trained at (``kl_budgets`` for finetune_kl)."""
        return list(self.kl_budgets or self.budgets) if kind == "finetune_kl" else list(self.budgets)

    @property
    def other_seed(self) -> Optional[int]:
        """The general SAE's second seed: the seed-to-seed controls (overlap, yardstick)."""
        return self.seeds[1] if len(self.seeds) > 1 else self.control_seed

    @property
    def steer(self) -> str:
        return self.steer_domain or list(self.domains)[-1]

    def heldout_tokens(self) -> int:
        """Held-out tokens sampled per corpus (the largest consumer)."""
        uses = {"steering": self.steering_tokens, "features": self.feature_tokens, "probing": self.probe_tokens}
        return max([self.recon_tokens, self.eval_tokens] + [n for a, n in uses.items() if a in self.analyses])

    # -- checks ----------------------------------------------------------------------------------------------------
    def validate(self) -> "StudyConfig":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(isinstance(self.domains, dict) and len(self.domains) >= 1,
             f"domains must map at least one name to a data spec, e.g. {{chat: chat, code: code}}; got "
             f"{self.domains!r}.")
        for name, spec in self.domains.items():
            need(isinstance(name, str) and name.strip() and isinstance(spec, str) and spec.strip(),
                 f"domains: {name!r}: {spec!r} must be a name and a data spec (both strings).")
            need(name != GENERAL and not any(c in name for c in "→@+|"),
                 f"domains: the name {name!r} is reserved or contains one of → @ + |; pick another name.")
            try:  # domain names become cache directory names
                safe_component(name, "The domain name")
            except OutputDirError as e:
                raise ConfigError(f"domains: {e}") from None
        check_finite_floats(self)
        need(len(self.hooks) >= 1 and all(isinstance(h, str) and h for h in self.hooks),
             f"hooks must list at least one hook name; got {self.hooks!r}.")
        need(self.architecture in STUDY_ARCHITECTURES, f"the study trains architecture "
             f"{' | '.join(STUDY_ARCHITECTURES)}; got {self.architecture!r}.")
        need(len(self.sparsity) >= 1 and len(set(self.sparsity)) == len(self.sparsity)
             and all(x > 0 for x in self.sparsity), f"sparsity needs distinct positive values; got {self.sparsity}.")
        if self.sparsity_knob == "k":
            need(all(float(x).is_integer() for x in self.sparsity),
                 f"sparsity holds k values for {self.architecture} SAEs: integers; got {self.sparsity}.")
        need(len(set(self.seeds)) == len(self.seeds) >= 1, f"seeds must be distinct; got {self.seeds}.")
        need(self.control_seed is None or self.control_seed not in self.seeds,
             "control_seed must differ from every seed (the pair measures the seed-to-seed spread).")
        unknown = [c for c in self.conditions if c not in CONDITIONS]
        need(not unknown, f"conditions: unknown {unknown}; choose from {', '.join(CONDITIONS)}.")
        need({"general", "scratch"} <= set(self.conditions), "conditions must include general and scratch (every "
             "comparison is made against them).")
        unknown = [a for a in self.analyses if a not in ANALYSES]
        need(not unknown, f"analyses: unknown {unknown}; choose from {', '.join(ANALYSES)}.")
        b = self.train_batch_size_tokens
        need(b > 0 and self.context_size >= 2, "train_batch_size_tokens must be > 0 and context_size >= 2.")
        need(b >= len(self.general_weights()), f"train_batch_size_tokens ({b}) is too small to split between "
                                               f"{len(self.general_weights())} general-mixture parts.")
        need(all(isinstance(w, (int, float)) and w > 0 for w in self.general_weights().values()),
             f"general_mix maps data specs (or domain names) to positive weights; got {self.general_mix!r}.")
        for name in ("general_tokens", "scratch_tokens", "residual_tokens"):
            need(getattr(self, name) >= b, f"{name} ({getattr(self, name)}) is smaller than one batch ({b} tokens).")
        need(len(self.budgets) >= 1 and self.budgets == sorted(set(self.budgets)) and self.budgets[0] >= b,
             f"budgets must be increasing and each hold at least one batch ({b} tokens); got {self.budgets}.")
        need(set(self.kl_budgets) <= set(self.budgets),
             f"kl_budgets {self.kl_budgets} must be budgets of {self.budgets}.")
        if self.train_to_plateau:
            need(b <= self.plateau_first_tokens <= self.plateau_max_tokens and self.plateau_per_doubling >= 1,
                 f"train_to_plateau needs train_batch_size_tokens ({b}) <= plateau_first_tokens "
                 f"({self.plateau_first_tokens}) <= plateau_max_tokens ({self.plateau_max_tokens}) and "
                 f"plateau_per_doubling >= 1.")
        need(self.n_paired_bootstrap >= 100,
             f"n_paired_bootstrap must be at least 100 (got {self.n_paired_bootstrap}).")
        need(self.headline_budget is None or self.headline_budget in self.budgets,
             f"headline_budget ({self.headline_budget}) must be one of budgets {self.budgets}.")
        need(self.buffer_size_tokens >= b, "buffer_size_tokens must be at least train_batch_size_tokens.")
        need(self.d_sae is None or self.d_sae > 0, f"d_sae must be positive (got {self.d_sae}).")
        need(self.expansion_factor > 0 and self.residual_d_sae > 0, "expansion_factor and residual_d_sae must be "
                                                                    "positive.")
        for name in ("eval_tokens", "recon_tokens", "steering_tokens", "probe_tokens"):
            need(getattr(self, name) >= 2, f"{name} must be at least 2 tokens.")
        need(self.n_bootstrap >= 0 and self.feature_tokens >= 1, "n_bootstrap must be >= 0, feature_tokens >= 1.")
        need(self.lr > 0 and self.finetune_lr > 0, "lr and finetune_lr must be > 0.")
        need(0 < self.match_threshold <= 1, "match_threshold must be in (0, 1].")
        need(self.n_l0_grid >= 1 and len(self.probe_ks) >= 1 and all(k >= 1 for k in self.probe_ks),
             "n_l0_grid must be >= 1 and probe_ks positive.")
        need(self.n_prompts >= 2, "n_prompts must be at least 2 (a mean needs samples).")
        need(len(self.prompt_labels) == 2, f"prompt_labels needs two names (set A, set B); got {self.prompt_labels}.")
        need(self.steer in self.domains, f"steer_domain {self.steer!r} is not one of the domains {list(self.domains)}.")
        need(len(self.steering_strengths) > 0, "steering_strengths must list at least one strength.")
        need(self.generate_tokens >= 0, "generate_tokens must be >= 0.")
        return self


def load_study_config(path: Optional[str] = None, overrides: Optional[dict] = None) -> StudyConfig:
    """defaults < file (YAML/TOML) < overrides; validated."""
    values = load_config_file(path) if path else {}
    values.update(overrides or {})
    return from_dict(StudyConfig, values, source=str(path or "study options")).validate()


# The schedule of every SAE of the study, in parts of its ``steps = tokens // train_batch_size_tokens`` (runs of very
# different lengths -- the budget ladder -- get the same shape of schedule).
LR_WARM_UP_PARTS, LR_DECAY_PARTS, L1_WARM_UP_PARTS, SPARSITY_WINDOW_PARTS, LOGS_PER_RUN = 20, 5, 20, 4, 10


def study_schedule(steps: int) -> dict[str, int]:
    """TrainConfig schedule options of one study SAE of ``steps`` optimizer steps: linear LR warm-up over the first
    5% and linear decay over the last 20%, L1 warm-up over the first 5%, sparsity windows of a quarter of the run
    (at least 10 steps), ten log lines per run."""
    window = max(10, steps // SPARSITY_WINDOW_PARTS)
    return {"lr_warm_up_steps": steps // LR_WARM_UP_PARTS, "lr_decay_steps": steps // LR_DECAY_PARTS,
            "l1_warm_up_steps": steps // L1_WARM_UP_PARTS, "feature_sampling_window": window,
            "dead_feature_window": window, "log_every": max(1, steps // LOGS_PER_RUN)}


def plateau_schedule(first_steps: int) -> dict[str, int]:
    """TrainConfig schedule options of an SAE trained to the plateau (its length is decided while it trains): the
    warm-ups of :func:`study_schedule` for a run of ``2 * first_steps`` (done before the first checkpoint), then a
    constant learning rate with no decay, so that the SAE at any checkpoint is the SAE a shorter run would give;
    sparsity windows and logs as for that run."""
    return {**study_schedule(2 * first_steps), "lr_decay_steps": 0}
