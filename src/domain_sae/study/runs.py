"""The study's runs as data, and a store that trains each run once.

A run is ``(kind, domain, seed, sparsity, budget)``; its parent, token count, data, learning rate and extra training
options follow from its kind (:data:`KINDS`). Adding a condition is one :class:`Kind` entry (and its name in
``config.CONDITIONS``); the plan, the store, the measurements and the report's comparisons pick it up. End-to-end
(KL) fine-tuning is such an entry: ``options={"objective": "kl"}`` and ``live`` (it trains from the model, whose
next-token distributions its loss needs, not from the caches).

A run is saved under ``<out>/<hook>/saes/<run dir>/sae`` by :func:`domain_sae.runs.single.train`; the marker
``study_done.json`` beside it (written after the SAE) records the run's training options, so a killed study reloads
every finished SAE, retrains the run it was in, and retrains a run whose options have changed since.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..activations.cache import CachedActivationSource
from ..activations.mixture import MixtureSource
from ..activations.residual import ResidualSource
from ..config import TrainConfig, to_dict
from ..data.mixture import weighted_shares
from ..runs import single
from ..sae.io import load_sae
from ..sae.residual import ResidualStackSAE
from ..util.jsonsafe import write_json
from .config import GENERAL, StudyConfig, study_schedule

DONE_MARKER = "study_done.json"
_NOT_IDENTITY = ("output_dir", "run_name", "overwrite", "device")


def _budget(cfg: StudyConfig, b: Optional[int]) -> int:
    return int(b)


@dataclass(frozen=True)
class Kind:
    """What a kind of run is: ``label`` (condition name, ``{d}`` domain, ``{b}`` budget), ``data`` (``domain`` or
    ``general``), ``per_budget`` (one run per budget), ``parent`` (starts from the general SAE of the same seed and
    sparsity: its weights when ``init``, else frozen beneath it: the residual), ``tokens(cfg, budget)``, ``lr`` (the
    StudyConfig option), ``options`` (TrainConfig options of this kind), ``live`` (trains from the model)."""

    label: str
    data: str
    per_budget: bool
    tokens: Callable[[StudyConfig, Optional[int]], int]
    parent: bool = False
    init: bool = False
    lr: str = "lr"
    options: dict = field(default_factory=dict)
    live: bool = False


KINDS: dict[str, Kind] = {
    "general": Kind("general", "general", False, lambda c, b: c.general_tokens),
    "scratch": Kind("{d} scratch", "domain", False, lambda c, b: c.scratch_tokens),
    "finetune": Kind("general→{d} @ {b}", "domain", True, _budget, parent=True, init=True, lr="finetune_lr"),
    "scratch_budget": Kind("{d} scratch @ {b}", "domain", True, _budget),
    "scratch_total": Kind("{d} scratch, total @ {b}", "domain", True, lambda c, b: c.general_tokens + int(b)),
    "continue": Kind("general continued @ {b}", "general", True, _budget, parent=True, init=True, lr="finetune_lr"),
    "residual": Kind("general+residual→{d}", "domain", False, lambda c, b: c.residual_tokens, parent=True),
    "finetune_kl": Kind("general→{d} (KL) @ {b}", "domain", True, _budget, parent=True, init=True, lr="finetune_lr",
                        options={"objective": "kl"}, live=True),
}


@dataclass(frozen=True)
class Run:
    """One SAE of the study at one hook."""

    kind: str
    domain: Optional[str]
    seed: int
    sparsity: float  # the L1 coefficient, or k for the TopK family
    budget: Optional[int] = None

    @property
    def condition(self) -> str:
        return KINDS[self.kind].label.format(d=self.domain, b=self.budget)

    def tokens(self, cfg: StudyConfig) -> int:
        return KINDS[self.kind].tokens(cfg, self.budget)

    def parent(self) -> Optional["Run"]:
        return Run(GENERAL, None, self.seed, self.sparsity) if KINDS[self.kind].parent else None

    def dirname(self, knob: str) -> str:
        slug = self.condition.replace("→", "_to_").replace("+", "_plus_").replace("@", "at")
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{slug}_seed{self.seed}_{knob}_{self.sparsity:g}").strip("_")


def plan_runs(cfg: StudyConfig) -> list[Run]:
    """Every run of one hook, parents first: general (every seed, the control seed, every sparsity), then per
    domain and seed the runs of each condition of ``cfg.conditions``."""
    on = set(cfg.conditions)
    seeds = list(cfg.seeds) + ([cfg.control_seed] if cfg.control_seed is not None else [])
    runs = [Run(GENERAL, None, s, x) for s in seeds for x in cfg.sparsity]
    if "continue" in on:
        runs += [Run("continue", None, s, x, b) for s in cfg.seeds for x in cfg.sparsity for b in cfg.budgets]
    for d in cfg.domains:
        for s in cfg.seeds:
            for x in cfg.sparsity:
                runs.append(Run("scratch", d, s, x))
                runs += [Run(k, d, s, x, b) for b in cfg.budgets for k in ("finetune", "finetune_kl",
                                                                            "scratch_budget", "scratch_total")
                         if k in on]
            if "residual" in on:
                runs.append(Run("residual", d, s, cfg.residual_sparsity))
    return runs


def main_runs(cfg: StudyConfig) -> dict[str, Run]:
    """The runs of the single-point analyses (first seed, middle sparsity), by report label: the general SAE, its
    other seed, each domain's scratch SAE and the general SAE fine-tuned at the headline budget."""
    s, x = cfg.seeds[0], cfg.middle_sparsity
    out = {GENERAL: Run(GENERAL, None, s, x)}
    if cfg.other_seed is not None:
        out[f"{GENERAL} (seed {cfg.other_seed})"] = Run(GENERAL, None, cfg.other_seed, x)
    for d in cfg.domains:
        out[f"{d} scratch"] = Run("scratch", d, s, x)
    if "finetune" in cfg.conditions:
        for d in cfg.domains:
            out[f"{GENERAL}→{d}"] = Run("finetune", d, s, x, cfg.headline)
    return out


def eval_sets(cfg: StudyConfig, run: Run) -> list[str]:
    """Held-out sets a run is measured on: every set for general-data runs and for the main runs when the matrix
    is on; its domain and the general set (forgetting) for runs with a parent; else its domain."""
    every = [GENERAL, *cfg.domains]
    if run.domain is None or ("matrix" in cfg.analyses and run in main_runs(cfg).values()):
        return every
    return [run.domain, GENERAL] if KINDS[run.kind].parent else [run.domain]


def wants_lm(cfg: StudyConfig, run: Run) -> bool:
    """Whether ``run`` gets the model-pass metrics (CE-loss score, KL): always, except off-headline budgets when
    ``ce_for_budgets`` is off."""
    return cfg.ce_for_budgets or run.budget is None or run.budget == cfg.headline


def train_config(cfg: StudyConfig, *, hook: str, data: str, tokens: int, seed: int, lr: float, name: str,
                 output_dir: Path, sparsity: Optional[float] = None, **options: Any) -> TrainConfig:
    """The TrainConfig of one study SAE: ``tokens`` training tokens on ``data`` at ``sparsity`` (k or the L1
    coefficient); no checkpoints, no in-training evaluation (the study measures every SAE itself)."""
    x = cfg.middle_sparsity if sparsity is None else sparsity
    knob = {"k": int(x)} if cfg.sparsity_knob == "k" else {"l1_coefficient": float(x)}
    values = dict(model=cfg.model, hook=hook, device=cfg.device, data=data, context_size=cfg.context_size,
                  holdout_fraction=cfg.holdout_fraction, architecture=cfg.architecture,
                  expansion_factor=cfg.expansion_factor, d_sae=cfg.d_sae, training_tokens=tokens,
                  train_batch_size_tokens=cfg.train_batch_size_tokens, buffer_size_tokens=cfg.buffer_size_tokens,
                  lr=lr, seed=seed, eval_every=0, n_checkpoints=0, resume_checkpoint_minutes=0,
                  output_dir=str(output_dir), run_name=name, overwrite=True,
                  **study_schedule(max(1, tokens // cfg.train_batch_size_tokens)), **knob)
    values.update(options)
    return TrainConfig(**values).validate()


def _refills(tokens: int, batch: int, buffer: int, total_batch: int) -> int:
    """Refills of a part serving ``batch`` of every ``total_batch``-token step, ``buffer`` positions a refill."""
    return math.ceil((tokens // total_batch) / max(1, buffer // batch))


def general_parts(cfg: StudyConfig) -> dict[str, tuple[int, int]]:
    """General-mix part -> (tokens of every batch, buffer positions): exact shares of every batch."""
    w = cfg.general_weights()
    batches = weighted_shares(cfg.train_batch_size_tokens, w)
    buffers = weighted_shares(cfg.buffer_size_tokens, w)
    return {k: (batches[k], max(batches[k], buffers[k])) for k in w}


def cache_tokens(cfg: StudyConfig, corpus: str) -> int:
    """Training positions cached for ``corpus``: its largest consumer (a general-mix part: what the general SAE and
    the ``continue`` runs read, which start after it; a domain: its longest single-domain run)."""
    need = [cfg.train_batch_size_tokens]
    if corpus in (parts := general_parts(cfg)):
        b, buf = parts[corpus]
        more = max(cfg.budgets) if "continue" in cfg.conditions else 0
        total = cfg.train_batch_size_tokens
        need.append((_refills(cfg.general_tokens, b, buf, total) + _refills(more, b, buf, total)) * buf)
    if corpus in cfg.domains:
        need += [Run(k, corpus, 0, 0, max(cfg.budgets)).tokens(cfg) for k in cfg.conditions
                 if KINDS[k].data == "domain" and not KINDS[k].live]
    return max(need)


class _FromPosition(CachedActivationSource):
    """A cache source whose data starts at position ``start`` (the positions before it were another run's)."""

    def __init__(self, path: Path, start: int, **kw: Any):
        super().__init__(path, **kw)
        self._base += start
        self.n_tokens -= start


def activation_source(cfg: StudyConfig, caches: dict[str, Path], run: Run):
    """Batches of the run's domain cache, or of the general mixture; ``continue`` runs start after the positions
    the general SAE read (fresh general tokens)."""
    def one(name: str, batch: int, buffer: int, start: int = 0) -> CachedActivationSource:
        return _FromPosition(caches[name], start, batch_size=batch, buffer_tokens=buffer, seed=run.seed, repeat=True)

    if KINDS[run.kind].data == "domain":
        return one(run.domain, cfg.train_batch_size_tokens, cfg.buffer_size_tokens)
    total = cfg.train_batch_size_tokens
    return MixtureSource(*(one(name, b, buf, _refills(cfg.general_tokens, b, buf, total) * buf
                               if run.kind == "continue" else 0) for name, (b, buf) in general_parts(cfg).items()))


class SAEStore:
    """The SAEs of one hook: each trained once (a finished run, whose marker records the same options, is loaded
    from disk instead). ``caches()`` gives corpus -> training cache folder of this hook (built on first use)."""

    def __init__(self, cfg: StudyConfig, hook: str, out: Path, caches: Callable[[], dict[str, Path]], lm: Any,
                 log: Callable[[str], None] = print):
        self.cfg, self.hook, self.out, self.caches, self.lm, self.log = cfg, hook, Path(out), caches, lm, log
        self._loaded: dict[Run, Any] = {}
        self.trained_now = 0

    def run_dir(self, run: Run) -> Path:
        return self.out / "saes" / run.dirname(self.cfg.sparsity_knob)

    def train_config(self, run: Run) -> TrainConfig:
        k, cfg = KINDS[run.kind], self.cfg
        data = cfg.domains[run.domain] if k.data == "domain" else "+".join(cfg.corpora()[n]
                                                                          for n in cfg.general_weights())
        extra = {"d_sae": cfg.residual_d_sae} if run.kind == "residual" else {}
        return train_config(cfg, hook=self.hook, data=data, tokens=run.tokens(cfg), seed=run.seed,
                            lr=getattr(cfg, k.lr), name=run.dirname(cfg.sparsity_knob), output_dir=self.out / "saes",
                            sparsity=run.sparsity, **extra, **k.options)

    def _identity(self, run: Run) -> dict:
        return {k: v for k, v in to_dict(self.train_config(run)).items() if k not in _NOT_IDENTITY}

    def is_done(self, run: Run) -> bool:
        marker = self.run_dir(run) / DONE_MARKER
        try:
            return json.loads(marker.read_text()).get("options") == json.loads(json.dumps(self._identity(run)))
        except (OSError, ValueError):
            return False

    def get(self, run: Run) -> Any:
        """The SAE of ``run`` (the residual SAE alone for kind ``residual``), trained now unless already done."""
        if run not in self._loaded:
            self._loaded[run] = (load_sae(self.run_dir(run) / "sae") if self.is_done(run) else self._train(run)).eval()
        return self._loaded[run]

    def measured(self, run: Run) -> Any:
        """The SAE that is measured for ``run``: the stack general + residual for residual runs."""
        sae = self.get(run)
        return ResidualStackSAE(self.get(run.parent()), sae) if run.kind == "residual" else sae

    def forget(self, keep: Callable[[Run], bool] = lambda r: r.kind == GENERAL) -> None:
        """Drop loaded SAEs from memory (they stay on disk) except those ``keep`` accepts."""
        self._loaded = {r: v for r, v in self._loaded.items() if keep(r)}

    def _train(self, run: Run) -> Any:
        k = KINDS[run.kind]
        parent = self.get(run.parent()) if k.parent else None
        source = None if k.live else activation_source(self.cfg, self.caches(), run)
        if run.kind == "residual":
            source = ResidualSource(source, parent)
        t = time.monotonic()
        tcfg = self.train_config(run)
        res = single.train(tcfg, lm=self.lm, source=source, init_sae=parent if k.init else None, quiet=True)
        write_json(self.run_dir(run) / DONE_MARKER, {"condition": run.condition, "seconds": round(
            time.monotonic() - t, 1), "options": self._identity(run)}, indent=1)
        self.trained_now += 1
        self.log(f"[study]   {self.hook}: {run.condition} (seed {run.seed}, {self.cfg.knob_label} {run.sparsity:g}): "
                 f"{tcfg.training_tokens:,} tokens in {time.monotonic() - t:.0f} s")
        return res.sae


__all__ = ["KINDS", "Kind", "Run", "plan_runs", "main_runs", "eval_sets", "wants_lm", "train_config", "cache_tokens",
           "activation_source", "general_parts", "SAEStore", "DONE_MARKER"]
