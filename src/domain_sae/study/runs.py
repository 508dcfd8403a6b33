"""The study's runs as data, and a store that trains each run once.

A run is ``(kind, domain, seed, sparsity, budget)``; its parent, token count, data, learning rate and extra training
options follow from its kind (:data:`KINDS`). Adding a condition is one :class:`Kind` entry (and its name in
``config.CONDITIONS``); the plan, the store, the measurements and the report's comparisons pick it up. End-to-end
(KL) fine-tuning is such an entry: ``options={"objective": "kl"}`` and ``live`` (it trains from the model, whose
next-token distributions its loss needs, not from the caches).

A run is saved under ``<out>/<hook>/saes/<run dir>/sae`` by :func:`domain_sae.runs.single.train`; the marker
``study_done.json`` beside it (written after the SAE) records the run's training options and the tokens it trained
on, so a killed study reloads every finished SAE, retrains the run it was in, and retrains a run whose options have
changed since. With ``train_to_plateau`` the general and scratch SAEs train in stages (:mod:`.plateau`): their
length is decided while they train (a killed one continues from its last doubling), and the runs sized by them
follow their actual token count T_g: ``scratch_total`` trains T_g + b tokens (at most one pass over its domain's
training split), ``continue`` reads the general tokens after the T_g the general SAE read.
"""

from __future__ import annotations

import json
import math
import re
import shutil
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
from ..util.atomic import atomic_directory
from ..util.jsonsafe import write_json
from ..util.outdirs import write_marker
from . import plateau
from .config import GENERAL, StudyConfig, study_schedule

DONE_MARKER = "study_done.json"
_NOT_IDENTITY = ("output_dir", "run_name", "overwrite", "device")


def _budget(cfg: StudyConfig, b: Optional[int]) -> int:
    return int(b)


def _general(cfg: StudyConfig, b: Optional[int] = None) -> int:
    """Planned tokens of a general SAE: ``general_tokens``, or at most ``plateau_max_tokens`` (train_to_plateau)."""
    return cfg.plateau_max_tokens if cfg.train_to_plateau else cfg.general_tokens


def _scratch(cfg: StudyConfig, b: Optional[int] = None) -> int:
    """Planned tokens of a scratch SAE: ``scratch_tokens``; with train_to_plateau at most ``plateau_max_tokens``
    to its stop, and on to the largest scratch_total it hands over (:mod:`.plateau`)."""
    if not cfg.train_to_plateau:
        return cfg.scratch_tokens
    return cfg.plateau_max_tokens + (max(cfg.budgets) if "scratch_total" in cfg.conditions else 0)


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
    "general": Kind("general", "general", False, _general),
    "scratch": Kind("{d} scratch", "domain", False, _scratch),
    "finetune": Kind("general→{d} @ {b}", "domain", True, _budget, parent=True, init=True, lr="finetune_lr"),
    "scratch_budget": Kind("{d} scratch @ {b}", "domain", True, _budget),
    "scratch_total": Kind("{d} scratch, total @ {b}", "domain", True, lambda c, b: _general(c) + int(b)),
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
        """Planned training tokens (with train_to_plateau an upper bound for general, scratch and scratch_total:
        :meth:`SAEStore.trained_tokens` gives the count trained)."""
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
                         if k in on and b in cfg.budgets_of(k)]
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


def wants_lm(cfg: StudyConfig, run: Run, eval_set: Optional[str] = None) -> bool:
    """Whether ``run`` gets the model-pass metrics (CE-loss score, KL) (on ``eval_set``): always, except
    off-headline budgets when ``ce_for_budgets`` is off, and the general set off the headline budget when
    ``ce_general_every_budget`` is off."""
    if run.budget is None or run.budget == cfg.headline:
        return True
    if eval_set == GENERAL and not cfg.ce_general_every_budget:
        return False
    return cfg.ce_for_budgets


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
        need.append((_refills(_general(cfg), b, buf, total) + _refills(more, b, buf, total)) * buf)
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


def activation_source(cfg: StudyConfig, caches: dict[str, Path], run: Run, general_tokens: Optional[int] = None):
    """Batches of the run's domain cache, or of the general mixture; ``continue`` runs start after the positions
    the general SAE read in its ``general_tokens`` (default the planned count): fresh general tokens."""
    def one(name: str, batch: int, buffer: int, start: int = 0) -> CachedActivationSource:
        return _FromPosition(caches[name], start, batch_size=batch, buffer_tokens=buffer, seed=run.seed, repeat=True)

    if KINDS[run.kind].data == "domain":
        return one(run.domain, cfg.train_batch_size_tokens, cfg.buffer_size_tokens)
    total = cfg.train_batch_size_tokens
    seen = general_tokens or _general(cfg)
    return MixtureSource(*(one(name, b, buf, _refills(seen, b, buf, total) * buf if run.kind == "continue" else 0)
                           for name, (b, buf) in general_parts(cfg).items()))


class SAEStore:
    """The SAEs of one hook: each trained once (a finished run, whose marker records the same options, is loaded
    from disk instead). ``caches()`` gives corpus -> training cache folder of this hook (built on first use),
    ``one_pass()`` corpus -> its training split's tokens when the cache holds all of it (else None), and
    ``held_ev(sae, set)`` the held-out explained variance and L0 that decide the plateau (:mod:`.plateau`)."""

    def __init__(self, cfg: StudyConfig, hook: str, out: Path, caches: Callable[[], dict[str, Path]], lm: Any,
                 log: Callable[[str], None] = print, *, one_pass: Callable[[], dict[str, Optional[int]]] = dict,
                 held_ev: Optional[Callable[[Any, str], dict]] = None):
        self.cfg, self.hook, self.out, self.caches, self.lm, self.log = cfg, hook, Path(out), caches, lm, log
        self.one_pass, self.held_ev = one_pass, held_ev
        self._loaded: dict[Run, Any] = {}
        self.trained_now = 0

    def run_dir(self, run: Run) -> Path:
        return self.out / "saes" / run.dirname(self.cfg.sparsity_knob)

    def marker(self, run: Run) -> dict:
        try:
            return json.loads((self.run_dir(run) / DONE_MARKER).read_text())
        except (OSError, ValueError):
            return {}

    def trained_tokens(self, run: Run) -> Optional[int]:
        """Tokens the finished run trained on (its marker), the planned count for a run that is not staged, None
        for a staged run not trained yet."""
        got = self.marker(run).get("tokens") if self.is_done(run) else None
        if got is not None:
            return int(got)
        return None if plateau.staged(self.cfg, run) else run.tokens(self.cfg)

    def _tokens(self, run: Run) -> Optional[int]:
        """The run's TrainConfig tokens: the cap of a run trained to the plateau; for scratch_total under
        train_to_plateau the general SAE's tokens + b (None while it is untrained)."""
        if run.kind == "scratch_total" and self.cfg.train_to_plateau:
            t = self.trained_tokens(Run(GENERAL, None, run.seed, run.sparsity))
            return None if t is None else t + int(run.budget)
        return run.tokens(self.cfg)

    def train_config(self, run: Run) -> Optional[TrainConfig]:
        """The run's TrainConfig (None: it depends on a general SAE not trained yet)."""
        k, cfg = KINDS[run.kind], self.cfg
        tokens = self._tokens(run)
        if tokens is None:
            return None
        data = cfg.domains[run.domain] if k.data == "domain" else "+".join(cfg.corpora()[n]
                                                                          for n in cfg.general_weights())
        extra = {"d_sae": cfg.residual_d_sae} if run.kind == "residual" else {}
        if plateau.staged(cfg, run):
            extra.update(plateau.schedule(cfg))
        return train_config(cfg, hook=self.hook, data=data, tokens=tokens, seed=run.seed,
                            lr=getattr(cfg, k.lr), name=run.dirname(cfg.sparsity_knob), output_dir=self.out / "saes",
                            sparsity=run.sparsity, **extra, **k.options)

    def _identity(self, run: Run) -> Optional[dict]:
        tcfg = self.train_config(run)
        if tcfg is None:
            return None
        out = {k: v for k, v in to_dict(tcfg).items() if k not in _NOT_IDENTITY}
        if self.cfg.train_to_plateau and run.parent() is not None:  # the parent's length is decided in training
            out["parent_trained"] = self.marker(run.parent()).get("tokens")
        return out

    def is_done(self, run: Run) -> bool:
        ident = self._identity(run)
        return ident is not None and self.marker(run).get("options") == json.loads(json.dumps(ident))

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
        k, cfg = KINDS[run.kind], self.cfg
        if run.kind == "scratch_total" and cfg.train_to_plateau:
            self.get(Run(GENERAL, None, run.seed, run.sparsity))  # its tokens size this run
        parent = self.get(run.parent()) if k.parent else None
        seen = self.trained_tokens(run.parent()) if run.kind == "continue" else None
        source = None if k.live else activation_source(cfg, self.caches(), run, seen)
        if run.kind == "residual":
            source = ResidualSource(source, parent)
        t = time.monotonic()
        tcfg = self.train_config(run)
        record: dict = {}
        if plateau.staged(cfg, run):
            cap = cfg.plateau_max_tokens if run.kind == "scratch" else tcfg.training_tokens
            limit, split = plateau.limits(cfg, run, cap, self.one_pass())
            evaluate = snapshots = None
            if plateau.to_plateau(cfg, run):
                own = run.domain or GENERAL
                evaluate = lambda sae: self.held_ev(sae, own)  # noqa: E731
            if run.kind == "scratch" and "scratch_total" in cfg.conditions:
                snapshots = self._snapshots(run)
            sae, record = plateau.train_staged(cfg, tcfg, lm=self.lm, source=source, limit=limit, split=split,
                                               evaluate=evaluate, log=self.log, snapshots=snapshots)
        else:
            res = single.train(tcfg, lm=self.lm, source=source, init_sae=parent if k.init else None, quiet=True)
            sae, record = res.sae, {"tokens": int(res.summary.get("training_tokens") or tcfg.training_tokens)}
        write_json(self.run_dir(run) / DONE_MARKER, {"condition": run.condition, "seconds": round(
            time.monotonic() - t, 1), "options": self._identity(run), **record}, indent=1)
        if cfg.train_to_plateau:  # the full training states are not needed once a run is done (disk)
            shutil.rmtree(self.run_dir(run) / "checkpoints", ignore_errors=True)
        self.trained_now += 1
        self.log(f"[study]   {self.hook}: {run.condition} (seed {run.seed}, {cfg.knob_label} {run.sparsity:g}): "
                 f"{record['tokens']:,} tokens in {time.monotonic() - t:.0f} s"
                 + (f" ({record['stop']['text']})" if "stop" in record else ""))
        return sae

    def _snapshots(self, scratch: Run) -> dict[int, Callable[[Any, int], None]]:
        """Token count -> saver of the scratch_total runs of ``scratch``'s domain, seed and sparsity (T_g + b, at
        most the domain's training split) that are not done: the scratch run passes through each (:mod:`.plateau`)."""
        cfg, split = self.cfg, self.one_pass().get(scratch.domain)
        batch = cfg.train_batch_size_tokens
        self.get(Run(GENERAL, None, scratch.seed, scratch.sparsity))
        by_tokens: dict[int, list[tuple[Run, int]]] = {}
        for b in cfg.budgets_of("scratch_total"):
            run = Run("scratch_total", scratch.domain, scratch.seed, scratch.sparsity, b)
            target = self._tokens(run)
            if not self.is_done(run):
                by_tokens.setdefault(min(target, split or target), []).append((run, target))

        def saver(runs: list[tuple[Run, int]]) -> Callable[[Any, int], None]:
            def save(sae: Any, tokens: int) -> None:
                for run, target in runs:
                    write_marker(self.run_dir(run), "run")  # a run directory a run trained alone may replace
                    with atomic_directory(self.run_dir(run) / "sae") as tmp:
                        sae.save(tmp)
                    write_json(self.run_dir(run) / DONE_MARKER, {
                        "condition": run.condition, "options": self._identity(run), "tokens": tokens,
                        "target_tokens": target, "capped": tokens < target - target % batch, "split_tokens": split,
                        "from_run": scratch.dirname(cfg.sparsity_knob)}, indent=1)
                    self.log(f"[study]   {self.hook}: {run.condition} (seed {run.seed}): {tokens:,} tokens, taken "
                             f"from the scratch run" + (" (capped at one pass)" if tokens < target - target % batch
                                                        else ""))
            return save
        return {t: saver(runs) for t, runs in by_tokens.items()}


__all__ = ["KINDS", "Kind", "Run", "plan_runs", "main_runs", "eval_sets", "wants_lm", "train_config", "cache_tokens",
           "activation_source", "general_parts", "SAEStore", "DONE_MARKER"]
