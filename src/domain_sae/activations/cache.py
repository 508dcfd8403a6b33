"""Reading an on-disk activation cache of one hook: one model pass, several SAEs.

The caches are built by :func:`domain_sae.activations.hook_cache.build_cache` (`dsae cache`, the study), one folder
per hook, each in this single-hook layout::

    manifest.json              {"format": "domain-sae-activation-cache", "version": 1, "d_in", "n_tokens",
                                "n_sequences", "dtype", "exclude_special", "shards": [{"file", "n_tokens",
                                "sha256"}], "metadata": {...}}
    shard_00000.safetensors    "activations" [n, d_in], "token_ids" [n] int32, "segments" [n] int8 (segment codes,
                               see data/segments.py), "positions" [n] int32
    ...

Only the positions selected by the training mask are stored (padding never; special tokens only when the cache is
built with ``exclude_special=False``), in stream order. :class:`CachedActivationSource` serves them with exactly
the live store's refill / shuffle / state logic; its cursor counts cache positions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from safetensors import safe_open

from .live import (ActivationSourceError, ShuffleBufferSource, StoreStateError, training_mask)

__all__ = ["CachedActivationSource", "CacheError", "read_manifest", "MANIFEST", "FORMAT"]

MANIFEST = "manifest.json"
FORMAT = "domain-sae-activation-cache"


class CacheError(ActivationSourceError):
    """The activation cache is missing, corrupt, or cannot hold what was asked."""


def read_manifest(path: str | Path) -> dict:
    """The manifest of the cache at ``path``; :class:`CacheError` when it is not a complete cache."""
    p = Path(path) / MANIFEST
    if not p.is_file():
        raise CacheError(f"{path} is not an activation cache (no {MANIFEST}); build one with dsae cache.")
    try:
        manifest = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CacheError(f"{p} is corrupt ({e}); rebuild the cache.") from None
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{p} is not a {FORMAT} manifest.")
    for shard in manifest["shards"]:
        if not (Path(path) / shard["file"]).is_file():
            raise CacheError(f"Cache {path} lacks shard {shard['file']} named in its manifest; rebuild the cache.")
    return manifest


class CachedActivationSource(ShuffleBufferSource):
    """Shuffled float32 batches from a single-hook cache (module docstring).

    Same refill / shuffle / state logic as :class:`~.store.ActivationStore`: a refill reads the next cache positions
    in order until ``buffer_tokens`` are kept, shuffles them with a generator seeded by ``(seed, refill_index)``
    and serves whole batches (the leftover ``n mod batch_size`` are dropped). ``exclude_special=True`` on a cache
    built with special tokens filters them at read time; ``None`` keeps what the cache holds. ``repeat=True``
    wraps around at the end of the cache (epochs) instead of stopping. ``shard=(r, W)`` serves only the
    contiguous slice ``[r N / W, (r + 1) N / W)`` of the cache's N positions (rank r of W data-parallel ranks).
    """

    _cursor_key = "positions_before_refill"

    def __init__(self, path: str | Path, *, batch_size: int, buffer_tokens: int, seed: int = 0,
                 device: str | torch.device = "cpu", exclude_special: Optional[bool] = None, repeat: bool = False,
                 shard: tuple[int, int] = (0, 1)):
        super().__init__(batch_size=batch_size, buffer_tokens=buffer_tokens, seed=seed, device=device)
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if exclude_special is False and self.manifest["exclude_special"]:
            raise CacheError(f"Cache {path} was built without special-token positions; it cannot serve them "
                             f"(exclude_special=False). Rebuild it with exclude_special=False.")
        self._filter_special = bool(exclude_special) and not self.manifest["exclude_special"]
        self.repeat = bool(repeat)
        self.d_in = int(self.manifest["d_in"])
        rank, world = int(shard[0]), int(shard[1])
        total = int(self.manifest["n_tokens"])
        self._base = rank * total // world
        self.n_tokens = (rank + 1) * total // world - self._base
        self.metadata = self.manifest.get("metadata", {})
        self._ends = np.cumsum([s["n_tokens"] for s in self.manifest["shards"]])

    def _describe(self) -> str:
        return f"The activation cache {self.path}"

    def _seek(self, cursor: int) -> None:
        if cursor < 0 or (cursor > self.n_tokens and not self.repeat):
            raise StoreStateError(f"Position {cursor} is outside the cache {self.path} ({self.n_tokens} tokens); "
                                  f"it is not the cache the checkpoint was trained on.")
        self._cursor = cursor

    def _read_range(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Activations and segment codes of cache positions [start, stop) (within one pass of the cache)."""
        acts, segs = [], []
        shard = int(np.searchsorted(self._ends, start, side="right"))
        pos = start
        while pos < stop:
            begin = 0 if shard == 0 else int(self._ends[shard - 1])
            end = int(self._ends[shard])
            a, b = pos - begin, min(stop, end) - begin
            with safe_open(str(self.path / self.manifest["shards"][shard]["file"]), framework="pt") as f:
                acts.append(f.get_slice("activations")[a:b])
                segs.append(f.get_slice("segments")[a:b])
            pos = begin + b
            shard += 1
        return torch.cat(acts), torch.cat(segs)

    def _read_refill(self) -> torch.Tensor:
        kept: list[torch.Tensor] = []
        n_kept = n_read = 0
        while n_kept < self.buffer_tokens:
            if self.repeat and n_read >= self.n_tokens and n_kept == 0:
                break  # a whole pass kept nothing: avoid looping forever
            offset = self._cursor % self.n_tokens if self.repeat else self._cursor
            if offset >= self.n_tokens:
                break
            want = self.buffer_tokens - n_kept
            stop = min(self.n_tokens, offset + want)
            acts, segs = self._read_range(self._base + offset, self._base + stop)
            self._cursor += stop - offset
            n_read += stop - offset
            if self._filter_special:
                acts = acts[training_mask(segs.to(torch.int8), True)]
            kept.append(acts.to(self.device, torch.float32))
            n_kept += acts.shape[0]
        if not kept:
            return torch.empty(0, self.d_in, device=self.device)
        return torch.cat(kept)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["cache_n_tokens"] = self.n_tokens
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "cache_n_tokens" in state and int(state["cache_n_tokens"]) != self.n_tokens:
            raise StoreStateError(f"The saved state comes from a cache of {state['cache_n_tokens']} tokens but "
                                  f"{self.path} holds {self.n_tokens}; use the same cache to resume.")
        super().load_state_dict(state)
