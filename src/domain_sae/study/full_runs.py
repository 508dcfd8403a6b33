"""The rigorous study's SAEs: which runs (seeds x sparsity ladder x conditions x budgets), the general mixture source
with exact token shares, and a store that makes the study resumable run by run.

A run is saved under ``<out>/<hook>/saes/<run dir>/sae`` by :func:`domain_sae.runs.single.train`; a marker
``study_done.json`` beside it is written only after the SAE is saved, so a killed study reloads every finished SAE
and retrains only the run it was in (a run that was interrupted is trained again from its start).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ..runs import single as pipeline
from ..activations.cache import CachedActivationSource
from ..activations.mixture import MixtureSource
from ..activations.residual import ResidualSource
from ..data.mixture import weighted_shares
from ..sae.io import load_sae
from .config import GENERAL, finetuned_name, scratch_name
from .full_config import FullStudyConfig
from .saes import train_config

__all__ = ["RunSpec", "plan_runs", "budget_condition", "scratch_budget_condition", "residual_condition",
           "spec_of", "general_source", "domain_source", "SAEStore", "DONE_MARKER"]

DONE_MARKER = "study_done.json"


def budget_condition(domain: str, budget: int) -> str:
    return f"{finetuned_name(domain)} @ {budget}"


def scratch_budget_condition(domain: str, budget: int) -> str:
    return f"{scratch_name(domain)} @ {budget}"


def residual_condition(domain: str) -> str:
    return f"{GENERAL}+residual→{domain}"


@dataclass(frozen=True)
class RunSpec:
    """One SAE of the study. ``kind``: general | scratch | finetuned | scratch_budget | residual."""

    condition: str
    kind: str
    domain: Optional[str]
    tokens: int
    seed: int
    sparsity: float  # the L1 coefficient, or k for the TopK family (FullStudyConfig.sparsity_knob)
    budget: Optional[int] = None
    knob: str = "l1"

    @property
    def dirname(self) -> str:
        slug = self.condition.replace("→", "_to_").replace("+", "_plus_").replace("@", "at")
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{slug}_seed{self.seed}_{self.knob}_{self.sparsity:g}").strip("_")

    def parent(self, cfg: FullStudyConfig) -> Optional["RunSpec"]:
        """The general SAE a fine-tuned (or residual) run starts from: same seed and sparsity."""
        if self.kind not in ("finetuned", "residual"):
            return None
        return spec_of(cfg, "general", None, self.seed, sparsity=self.sparsity)


def plan_runs(cfg: FullStudyConfig) -> list[RunSpec]:
    """Every SAE of one hook, parents before children."""
    runs: list[RunSpec] = []
    for seed in cfg.seeds:
        runs += [spec_of(cfg, "general", None, seed, sparsity=x) for x in cfg.sparsity_ladder]
    for d in cfg.domains:
        for seed in cfg.seeds:
            for x in cfg.sparsity_ladder:
                runs.append(spec_of(cfg, "scratch", d, seed, sparsity=x))
                for b in cfg.budget_ladder:
                    runs += [spec_of(cfg, kind, d, seed, budget=b, sparsity=x)
                             for kind in ("finetuned", "scratch_budget")]
            runs.append(spec_of(cfg, "residual", d, seed))
    return runs


def spec_of(cfg: FullStudyConfig, kind: str, domain: Optional[str], seed: int, *, budget: Optional[int] = None,
            sparsity: Optional[float] = None) -> RunSpec:
    """The run of ``kind`` (general | scratch | finetuned | scratch_budget | residual) for ``domain`` and ``seed``;
    ``sparsity`` defaults to the ladder's middle value (the single-point analyses; ``residual_sparsity`` for
    residual runs)."""
    x = (cfg.residual_sparsity if kind == "residual" else cfg.middle_sparsity) if sparsity is None else sparsity
    kn = cfg.sparsity_knob
    if kind == "general":
        return RunSpec(GENERAL, kind, None, cfg.general_tokens, seed, x, knob=kn)
    if kind == "scratch":
        return RunSpec(scratch_name(domain), kind, domain, cfg.scratch_tokens, seed, x, knob=kn)
    if kind == "finetuned":
        return RunSpec(budget_condition(domain, budget), kind, domain, budget, seed, x, budget, knob=kn)
    if kind == "scratch_budget":
        return RunSpec(scratch_budget_condition(domain, budget), kind, domain, budget, seed, x, budget, knob=kn)
    if kind == "residual":
        return RunSpec(residual_condition(domain), kind, domain, cfg.residual_tokens, seed, x, knob=kn)
    raise ValueError(f"unknown run kind {kind!r}")


def domain_source(cfg: FullStudyConfig, caches: dict[str, Path], name: str, seed: int, *,
                  batch: Optional[int] = None, buffer: Optional[int] = None) -> CachedActivationSource:
    return CachedActivationSource(caches[name], batch_size=batch or cfg.train_batch_size_tokens,
                                  buffer_tokens=buffer or cfg.buffer_size_tokens, seed=seed, repeat=True)


def general_source(cfg: FullStudyConfig, caches: dict[str, Path], seed: int) -> MixtureSource:
    """Every batch: :func:`~domain_sae.data.mixture.weighted_shares` of its tokens from each general-mix part."""
    batches = weighted_shares(cfg.train_batch_size_tokens, cfg.general_mix)
    buffers = weighted_shares(cfg.buffer_size_tokens, cfg.general_mix)
    return MixtureSource(*(domain_source(cfg, caches, name, seed, batch=batches[name],
                                         buffer=max(batches[name], buffers[name])) for name in cfg.general_mix))


class SAEStore:
    """Trains each run once: a finished run (its marker exists) is loaded from disk instead."""

    def __init__(self, cfg: FullStudyConfig, hook: str, out: Path, caches: dict[str, Path], lm: Any, lm_hook: Any,
                 log: Callable[[str], None] = print):
        self.cfg, self.hook, self.out, self.caches, self.lm, self.log = cfg, hook, Path(out), caches, lm, log
        self.lm_hook = lm_hook  # the resolved hook point (what the evaluation splices at)
        self._loaded: dict[RunSpec, Any] = {}
        self.trained_now = 0

    def run_dir(self, spec: RunSpec) -> Path:
        return self.out / "saes" / spec.dirname

    def is_done(self, spec: RunSpec) -> bool:
        return (self.run_dir(spec) / DONE_MARKER).is_file()

    def get(self, spec: RunSpec) -> Any:
        """The SAE of ``spec`` (the residual SAE alone for kind ``residual``), trained now unless already done."""
        if spec in self._loaded:
            return self._loaded[spec]
        if self.is_done(spec):
            sae = load_sae(self.run_dir(spec) / "sae").eval()
        else:
            sae = self._train(spec)
        self._loaded[spec] = sae
        return sae

    def forget(self, keep: Callable[[RunSpec], bool]) -> None:
        """Drop loaded SAEs from memory (they stay on disk) except those ``keep`` accepts."""
        self._loaded = {s: v for s, v in self._loaded.items() if keep(s)}

    def _train(self, spec: RunSpec) -> Any:
        cfg = self.cfg.with_sparsity(spec.sparsity, hook=self.hook)
        parent_spec = spec.parent(self.cfg)
        parent = self.get(parent_spec) if parent_spec is not None else None
        if spec.kind == "general":
            data, source = "+".join(self.cfg.general_specs().values()), general_source(cfg, self.caches, spec.seed)
        else:
            data, source = self.cfg.domains[spec.domain], domain_source(cfg, self.caches, spec.domain, spec.seed)
        lr = cfg.finetune_lr if spec.kind == "finetuned" else cfg.lr
        init = parent if spec.kind == "finetuned" else None
        if spec.kind == "residual":
            source = ResidualSource(source, parent)
            cfg = dataclasses.replace(cfg, d_sae=self.cfg.residual_d_sae)
        tcfg = train_config(cfg, data=data, tokens=spec.tokens, seed=spec.seed, lr=lr, name=spec.dirname,
                            output_dir=self.out / "saes")
        t = time.monotonic()
        res = pipeline.train(tcfg, lm=self.lm, source=source, init_sae=init, quiet=True)
        (self.run_dir(spec) / DONE_MARKER).write_text(json.dumps(
            {"condition": spec.condition, "seed": spec.seed, spec.knob: spec.sparsity, "tokens": spec.tokens,
             "seconds": round(time.monotonic() - t, 1)}))
        self.trained_now += 1
        self.log(f"[study]   {spec.condition} (seed {spec.seed}, {self.cfg.knob_label} {spec.sparsity:g}): "
                 f"{spec.tokens:,} tokens in {time.monotonic() - t:.0f} s")
        return res.sae.eval()
