"""Inputs of the rigorous study at one hook: activation caches of every corpus (resumable: a complete cache on disk
is reused), held-out activation sets (each domain and the general mixture in its stated proportions), CE token sets
and the probing sets (code token types, chat turns)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable

import torch

from ..activations.cache import CacheError, build_activation_cache, read_manifest
from ..analysis.probing import chat_turn_labels, code_probe_tokens
from ..data.formatting import bos_token_id
from ..data.mixture import weighted_shares
from ..data.token_stream import TokenStream, heldout_batch
from ..data.sources import open_source
from ..data.splits import is_heldout
from ..models.hooks import capture, hook_d_in, resolve_hook
from .config import GENERAL
from .full_config import FullStudyConfig
from .inputs import HeldoutActivations, heldout_activations
from .saes import train_config

__all__ = ["HookInputs", "prepare_hook", "cache_tokens", "PROBE_CODE_SPEC"]

PROBE_CODE_SPEC = "code"


@dataclass
class HookInputs:
    hook_name: str
    hook: Any
    d_in: int
    caches: dict[str, Path] = field(default_factory=dict)
    cache_tokens: dict[str, int] = field(default_factory=dict)
    held: dict[str, HeldoutActivations] = field(default_factory=dict)
    ce_sets: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    probes: dict[str, dict] = field(default_factory=dict)


def cache_tokens(cfg: FullStudyConfig, name: str) -> int:
    """Tokens cached for corpus ``name``: its largest single consumer (a domain: scratch, largest budget, residual
    SAE, its share of the general SAE; a general-only part: its share of the general SAE)."""
    share = math.ceil(cfg.general_tokens * cfg.general_mix.get(name, 0.0) / sum(cfg.general_mix.values()))
    if name in cfg.domains:
        return max(cfg.scratch_tokens, max(cfg.budget_ladder), cfg.residual_tokens, share)
    return max(share, cfg.train_batch_size_tokens)


def _weighted_head(parts: dict[str, Any], weights: dict[str, float], n_rows: int) -> list:
    """The first rows of each part in proportion to ``weights`` (``n_rows`` in total, at least one per part)."""
    shares = weighted_shares(n_rows, weights)
    return [parts[k][:max(1, shares[k])] for k in weights]


def _held_general(cfg: FullStudyConfig, held: dict[str, HeldoutActivations]) -> HeldoutActivations:
    n = min(len(held[k].ids) for k in cfg.general_mix)
    parts = {k: held[k] for k in cfg.general_mix}
    shares = weighted_shares(n, cfg.general_mix)
    return HeldoutActivations.concat(*(HeldoutActivations(*(getattr(p, f)[:max(1, shares[k])]
                                                           for f in ("acts", "ids", "segments", "mask")))
                                       for k, p in parts.items()))


def _build_cache(lm, hook, d_in: int, dcfg, path: Path, n_tokens: int, name: str) -> int:
    try:
        man = read_manifest(path)
        if int(man["n_tokens"]) >= n_tokens and int(man["d_in"]) == d_in:
            return int(man["n_tokens"])
    except CacheError:
        pass
    stream = TokenStream(dcfg, lm.tokenizer, split="train", repeat=True)
    build_activation_cache(lambda ids: capture(lm.model, hook, ids.to(lm.device)).float(), stream, path, n_tokens,
                           d_in=d_in, metadata={"corpus": name}, overwrite=True)
    return int(read_manifest(path)["n_tokens"])


def _code_probe(cfg: FullStudyConfig, lm, hook, dcfg) -> dict:
    texts = (d.text for d in open_source(PROBE_CODE_SPEC) if d.text and is_heldout(d, cfg.holdout_fraction))
    ids, labels = code_probe_tokens(list(islice(texts, 400)), lm.tokenizer, cfg.context_size,
                                    max_tokens=cfg.probe_tokens, bos_id=bos_token_id(lm.tokenizer),
                                    pad_id=bos_token_id(lm.tokenizer) or 0, windows_per_document=1)
    acts = torch.cat([capture(lm.model, hook, ids[i:i + 8].to(lm.device)).float().cpu()
                      for i in range(0, len(ids), 8)])
    keep = labels >= 0
    return {"acts": acts[keep], "labels": labels[keep]}


def prepare_hook(cfg: FullStudyConfig, hook_name: str, out: Path, lm: Any, log: Callable[[str], None]) -> HookInputs:
    """Caches, held-out sets, CE sets and probing sets of one hook (see the module docstring)."""
    hook = resolve_hook(lm.model, hook_name)
    inp = HookInputs(hook_name, hook, hook_d_in(lm.model, hook))
    hcfg = dataclasses.replace(cfg, hook=hook_name)
    n_held = max(cfg.recon_tokens, cfg.eval_tokens)
    held_tokens: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, spec in cfg.corpora().items():
        dcfg = train_config(hcfg, data=spec, tokens=cfg.train_batch_size_tokens, seed=0, lr=cfg.lr, name=name,
                            output_dir=out / "saes")
        path = out / "cache" / name
        inp.cache_tokens[name] = _build_cache(lm, hook, inp.d_in, dcfg, path, cache_tokens(cfg, name), name)
        inp.caches[name] = path
        ids, segs = heldout_batch(dcfg, lm.tokenizer, n_held)
        held_tokens[name] = (ids, segs)
        inp.held[name] = heldout_activations(lm, hook, ids, segs)
        log(f"[study]   {hook_name}: {name} cache {inp.cache_tokens[name]:,} tokens, held-out {ids.numel():,}")
    inp.held[GENERAL] = _held_general(cfg, inp.held)
    for d in cfg.domains:
        ids, segs = held_tokens[d]
        k = max(cfg.ce_blocks, math.ceil(cfg.eval_tokens / ids.shape[1]))
        inp.ce_sets[d] = (ids[:k], segs[:k])
    parts = {k: held_tokens[k] for k in cfg.general_mix}
    k_gen = max(cfg.ce_blocks, math.ceil(cfg.eval_tokens / cfg.context_size))
    inp.ce_sets[GENERAL] = (torch.cat(_weighted_head({k: v[0] for k, v in parts.items()}, cfg.general_mix, k_gen)),
                            torch.cat(_weighted_head({k: v[1] for k, v in parts.items()}, cfg.general_mix, k_gen)))
    if "code" in cfg.domains:
        dcfg = train_config(hcfg, data=cfg.domains["code"], tokens=cfg.train_batch_size_tokens, seed=0, lr=cfg.lr,
                            name="probe", output_dir=out / "saes")
        inp.probes["code"] = _code_probe(cfg, lm, hook, dcfg)
    if "chat" in cfg.domains:
        h = inp.held["chat"]
        labels = chat_turn_labels(h.segments)
        keep = (labels >= 0) & h.mask
        inp.probes["chat"] = {"acts": h.acts[keep][:cfg.probe_tokens], "labels": labels[keep][:cfg.probe_tokens]}
    return inp
