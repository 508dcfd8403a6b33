"""On-disk activation cache: one model pass, several SAEs.

Layout of a cache directory (written atomically: into ``<name>.tmp-XXXX`` next to it, files fsync'ed, then
``os.replace``; an interrupted build never leaves a half-written cache under the final name)::

    manifest.json              {"format": "domain-sae-activation-cache", "version": 1, "d_in", "n_tokens",
                                "n_sequences", "dtype", "exclude_special", "shards": [{"file", "n_tokens"}],
                                "metadata": {...}}
    shard_00000.safetensors    "activations" [n, d_in] (float16 by default), "token_ids" [n] int32,
                               "segments" [n] int8 (segment codes, see data/segments.py)
    ...

Only the positions selected by the training mask are stored (padding never; special tokens only when the cache is
built with ``exclude_special=False``), in stream order. :class:`CachedActivationSource` serves them with exactly
the live store's refill / shuffle / state logic; its cursor counts cache positions.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

from ..util.atomic import atomic_directory, remove_leftovers
from ..util.outdirs import check_output_dir, write_marker
from safetensors import safe_open
from safetensors.torch import save_file

from .live import (ActivationSourceError, ShuffleBufferSource, StoreStateError, kept_activations, read_sequences,
                    training_mask)

__all__ = ["build_activation_cache", "CachedActivationSource", "CacheError", "read_manifest", "MANIFEST"]

MANIFEST = "manifest.json"
FORMAT = "domain-sae-activation-cache"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class CacheError(ActivationSourceError):
    """The activation cache is missing, corrupt, or cannot hold what was asked."""


def read_manifest(path: str | Path) -> dict:
    """The manifest of the cache at ``path``; :class:`CacheError` when it is not a complete cache."""
    p = Path(path) / MANIFEST
    if not p.is_file():
        raise CacheError(f"{path} is not an activation cache (no {MANIFEST}); build one with "
                         f"build_activation_cache().")
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


def build_activation_cache(activation_fn: Callable[[torch.Tensor], torch.Tensor], token_stream: Iterable,
                           path: str | Path, n_tokens: int, *, d_in: Optional[int] = None,
                           model_batch_size: int = 8, exclude_special: bool = True, dtype: str = "float16",
                           shard_tokens: Optional[int] = None, metadata: Optional[dict] = None,
                           overwrite: bool = False) -> Path:
    """Run ``activation_fn`` over ``token_stream`` and store the first ``n_tokens`` kept positions at ``path``.

    ``activation_fn``/``token_stream`` are those of :class:`~.store.ActivationStore`. ``shard_tokens`` defaults to
    about 256 MiB of activations per shard. A stream that ends early gives a smaller cache (with a warning; the
    manifest holds the true count). Returns ``path``.
    """
    path = Path(path)
    if dtype not in _DTYPES:
        raise CacheError(f"dtype must be one of {sorted(_DTYPES)} (got {dtype!r}).")
    if n_tokens <= 0:
        raise CacheError(f"n_tokens must be positive (got {n_tokens}).")
    # Only an activation cache (or an empty directory) is ever replaced; any other directory is refused.
    if check_output_dir(path, "activation-cache", overwrite=overwrite, option="cache path") == "ours" \
            and not overwrite:
        raise CacheError(f"{path} already exists (an activation cache); choose another path or pass overwrite=True "
                         f"to replace it.")
    torch_dtype = _DTYPES[dtype]
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path.parent, path.name)  # what a killed build of this cache left beside it
    with atomic_directory(path) as tmp:  # a crash leaves the previous cache (or none), never half of one
        shards: list[dict] = []
        pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        n_pending = n_written = n_sequences = 0

        def flush(limit: int) -> None:
            nonlocal pending, n_pending, n_written
            acts = torch.cat([p[0] for p in pending])
            ids = torch.cat([p[1] for p in pending])
            segs = torch.cat([p[2] for p in pending])
            take = min(limit, acts.shape[0])
            name = f"shard_{len(shards):05d}.safetensors"
            save_file({"activations": acts[:take].contiguous(), "token_ids": ids[:take].contiguous(),
                       "segments": segs[:take].contiguous()}, str(tmp / name))
            shards.append({"file": name, "n_tokens": int(take)})
            n_written += take
            rest = (acts[take:], ids[take:], segs[take:])
            pending = [rest] if rest[0].shape[0] else []
            n_pending = rest[0].shape[0]

        it = iter(token_stream)
        done = False
        while not done and n_written + n_pending < n_tokens:
            chunk = read_sequences(it, model_batch_size)
            if chunk is None:
                break
            ids, segs = chunk
            done = ids.shape[0] < model_batch_size
            n_sequences += ids.shape[0]
            kept, mask = kept_activations(activation_fn, ids, segs, d_in=d_in, exclude_special=exclude_special,
                                          error=CacheError)
            d_in = int(kept.shape[-1])
            sel32 = kept.detach().to("cpu", torch.float32)
            sel = sel32.to(torch_dtype)
            if not torch.isfinite(sel).all() and torch.isfinite(sel32).all():
                raise CacheError(f"Activations overflow {dtype} (max |x| = {sel32.abs().max():.4g}); build the cache "
                                 f"with dtype='float32' or 'bfloat16'.")
            pending.append((sel, ids[mask].to(torch.int32), segs[mask].to(torch.int8)))
            n_pending += sel.shape[0]
            if shard_tokens is None:
                shard_tokens = max(1, (256 * 2**20) // (d_in * sel.element_size()))
            while n_pending >= shard_tokens and n_written < n_tokens:
                flush(min(shard_tokens, n_tokens - n_written))
        if n_pending and n_written < n_tokens:
            flush(n_tokens - n_written)
        if n_written == 0:
            raise CacheError("The token stream gave no training positions; nothing to cache. Check the dataset and "
                             "exclude_special.")
        if n_written < n_tokens:
            warnings.warn(f"The token stream ended after {n_written} kept positions; the cache at {path} holds "
                          f"{n_written} of the {n_tokens} tokens asked for.", stacklevel=2)
        manifest = {"format": FORMAT, "version": 1, "d_in": int(d_in), "n_tokens": int(n_written),
                    "n_sequences": int(n_sequences), "dtype": dtype, "exclude_special": bool(exclude_special),
                    "shards": shards, "metadata": dict(metadata or {})}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        write_marker(tmp, "activation-cache")
    return path


class CachedActivationSource(ShuffleBufferSource):
    """Shuffled float32 batches from a cache built by :func:`build_activation_cache`.

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

    @property
    def positions_consumed(self) -> int:
        return self._cursor

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
