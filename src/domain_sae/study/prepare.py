"""Stage 1 of the study: load the model, build one activation cache per domain (one truncated model pass each) and
the held-out token sets with their activations. Also the stage timer every stage reports through."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from ..activations.cache import build_activation_cache, read_manifest
from ..config import TrainConfig
from ..data.token_stream import TokenStream, heldout_batch
from ..errors import UserError
from ..models.hooks import HookPoint, capture, hook_d_in, resolve_hook
from ..runs.single import load_lm
from .config import GENERAL, StudyConfig
from .inputs import HeldoutActivations, heldout_activations, mix_heldout
from .plan import cache_tokens_per_domain, d_sae_of, heldout_tokens_per_domain
from .saes import train_config


class StudyError(UserError):
    """The study cannot go on (e.g. a domain has no held-out data); the message says what to change."""


@dataclass
class StageRecord:
    """What one stage did: ``tokens`` per kind of work (truncated, full, sae, generated), SAE training ``runs``."""

    what: str
    tokens: dict[str, int] = field(default_factory=dict)
    runs: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"what": self.what, "tokens": self.tokens}
        if self.runs:
            out["runs"] = self.runs
        out["seconds"] = self.seconds
        return out


class StageTimer:
    """Wall-clock time and token counts of each stage, printed as they finish."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.records: dict[str, StageRecord] = {}

    @contextmanager
    def __call__(self, name: str, what: str) -> Iterator[StageRecord]:
        self.log(f"[study] {name}: {what}")
        rec = StageRecord(what)
        t = time.monotonic()
        yield rec
        rec.seconds = round(time.monotonic() - t, 1)
        self.records[name] = rec
        self.log(f"[study] {name} done in {rec.seconds:.0f} s")


@dataclass
class StudyInputs:
    """Everything the later stages read: the model and hook, the caches and the held-out sets (``GENERAL`` = the
    first 1/n of every domain's held-out sequences)."""

    cfg: StudyConfig
    out: Path
    lm: Any
    hook: HookPoint
    d_in: int
    d_sae: int
    timer: StageTimer
    log: Callable[[str], None]
    keep_saes: bool = True
    caches: dict[str, Path] = field(default_factory=dict)
    heldout_tokens: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    heldout_acts: dict[str, HeldoutActivations] = field(default_factory=dict)
    cache_tokens: dict[str, int] = field(default_factory=dict)

    @property
    def domains(self) -> list[str]:
        return list(self.cfg.domains)

    def model_json(self) -> dict[str, Any]:
        return {"name": self.cfg.model, "hook": self.cfg.hook, "source": self.lm.source, "d_in": self.d_in,
                "d_sae": self.d_sae}

    def data_json(self) -> dict[str, Any]:
        return {"cache_tokens": self.cache_tokens,
                "heldout_sequences": {d: int(t[0].shape[0]) for d, t in self.heldout_tokens.items()},
                "recon_tokens_counted": {d: int(h.mask.sum()) for d, h in self.heldout_acts.items()}}

    def eval_tokens(self, n_tokens: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The first sequences of every domain's held-out set holding at least ``n_tokens`` tokens."""
        out = {}
        for d in self.domains:
            ids, segs = self.heldout_tokens[d]
            k = max(1, math.ceil(n_tokens / ids.shape[1]))
            out[d] = (ids[:k], segs[:k])
        return out


def _domain_config(cfg: StudyConfig, spec: str, out: Path, name: str) -> TrainConfig:
    return train_config(cfg, data=spec, tokens=cfg.train_batch_size_tokens, seed=0, lr=cfg.lr, name=name,
                        output_dir=out / "saes")


def prepare(cfg: StudyConfig, out: Path, *, lm: Optional[Any], timer: StageTimer, log: Callable[[str], None],
            keep_saes: bool = True) -> StudyInputs:
    """Stages ``load`` and ``caches``: the model (unless given), one cache per domain, held-out tokens and
    activations. Raises :class:`StudyError` when a domain has no countable held-out token."""
    with timer("load", f"model {cfg.model}, hook {cfg.hook}"):
        if lm is None:
            lm = load_lm(_domain_config(cfg, next(iter(cfg.domains.values())), out, "probe"))
        hook = resolve_hook(lm.model, cfg.hook)
        d_in = hook_d_in(lm.model, hook)
    inp = StudyInputs(cfg, out, lm, hook, d_in, d_sae_of(cfg, d_in), timer, log, keep_saes)
    per_domain, n_held = cache_tokens_per_domain(cfg), heldout_tokens_per_domain(cfg)
    held: dict[str, HeldoutActivations] = {}
    with timer("caches", f"one model pass per domain: {per_domain:,} training tokens each, "
                         f"{n_held:,} held-out tokens") as rec:
        for name, spec in cfg.domains.items():
            held[name] = _prepare_domain(inp, name, spec, per_domain, n_held)
        rec.tokens = {"truncated": sum(inp.cache_tokens.values())
                      + sum(int(t[0].numel()) for t in inp.heldout_tokens.values())}
    inp.heldout_acts = {GENERAL: mix_heldout([held[d] for d in inp.domains]), **held}
    return inp


def _prepare_domain(inp: StudyInputs, name: str, spec: str, per_domain: int, n_held: int) -> HeldoutActivations:
    """One domain: its training cache (``per_domain`` tokens), its held-out tokens and their activations."""
    dcfg = _domain_config(inp.cfg, spec, inp.out, name)
    lm, hook = inp.lm, inp.hook
    path = inp.out / "cache" / name
    stream = TokenStream(dcfg, lm.tokenizer, split="train", repeat=True)
    build_activation_cache(lambda ids: capture(lm.model, hook, ids.to(lm.device)).float(), stream, path,
                           per_domain, d_in=inp.d_in, metadata={"domain": name}, overwrite=True)
    inp.cache_tokens[name] = int(read_manifest(path).get("n_tokens", per_domain))
    inp.caches[name] = path
    ids, segs = heldout_batch(dcfg, lm.tokenizer, n_held)
    inp.heldout_tokens[name] = (ids, segs)
    acts = heldout_activations(lm, hook, ids, segs)
    if int(acts.mask.sum()) == 0:
        raise StudyError(f"Domain {name!r} ({spec}) has no countable held-out tokens; raise holdout_fraction or "
                         f"use a larger dataset.")
    return acts
