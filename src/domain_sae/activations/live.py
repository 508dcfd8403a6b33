"""Shuffled activation buffer fed by the live language model.

A *refill* reads the next token sequences from a token stream, runs ``activation_fn`` on them in chunks of
``model_batch_size`` sequences, keeps the positions selected by the training mask (never padding; special tokens
only when ``exclude_special`` is off) until at least ``buffer_tokens`` positions are kept, shuffles them with a
``torch.Generator`` seeded by a pure function of ``(seed, refill_index)`` and serves them as ``[batch_size, d_in]``
float32 batches.

The ``n mod batch_size`` positions of a refill that do not fill a whole batch are DROPPED (never trained on): a
batch never mixes two refills, which is what makes the state below small and resume exact.

Exact resume: ``state_dict()`` records where the current refill started in the stream, its index and how many of
its batches were served. ``load_state_dict`` on a fresh store re-skips the stream to that point, recomputes the same
refill (same sequences, same permutation) and skips the batches already served, so the resumed store yields the
same batches as an uninterrupted one.

The same buffer logic (:class:`ShuffleBufferSource`) serves the on-disk cache in :mod:`.cache`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Optional, Protocol, runtime_checkable

import numpy as np
import torch

from ..data.segments import training_mask
from ..errors import UserError

__all__ = [
    "ActivationStore", "ShuffleBufferSource", "ActivationSourceError", "SourceExhaustedError", "StoreStateError",
    "refill_seed", "training_mask", "read_sequences", "kept_activations", "SkippableStream",
]


@runtime_checkable
class SkippableStream(Protocol):
    """A token stream that can leave out its first sequences without reading them (``data.pipeline.TokenStream``);
    any other iterable is advanced by reading when resuming."""

    def __iter__(self) -> Iterator: ...

    def skip(self, n_sequences: int) -> None: ...


class ActivationSourceError(UserError):
    """An activation source cannot deliver what was asked; the message says why and what to change."""


class SourceExhaustedError(ActivationSourceError):
    """The underlying token stream or cache ran out before a full batch could be served."""


class StoreStateError(ActivationSourceError):
    """A saved source state cannot be restored on this source (different data, or the source was already read)."""


def refill_seed(seed: int, refill_index: int) -> int:
    """Seed of the shuffle of refill ``refill_index``: a hash of ``(seed, refill_index)`` (numpy SeedSequence),
    so every refill's permutation is independent of everything else the run did."""
    state = np.random.SeedSequence([int(seed) % 2**64, int(refill_index)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])  # < 2**63


def read_sequences(it: Iterator, n: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """The next up to ``n`` ``(input_ids [ctx], segments [ctx])`` items of ``it``, stacked ``[n', ctx]``; None when
    ``it`` is exhausted. (Fewer than ``n`` rows means the stream ended.)"""
    ids, segs = [], []
    for _ in range(n):
        try:
            item = next(it)
        except StopIteration:
            break
        ids.append(torch.as_tensor(item[0], dtype=torch.long))
        segs.append(torch.as_tensor(item[1]))
    return (torch.stack(ids), torch.stack(segs)) if ids else None


def kept_activations(activation_fn: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, segs: torch.Tensor,
                     *, d_in: Optional[int], exclude_special: bool,
                     error: Optional[type[Exception]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One model chunk: ``acts = activation_fn(ids)`` (no grad) checked to be ``[*ids.shape, d_in]`` (any width when
    ``d_in`` is None), and the training mask of ``segs``; returns ``(acts[mask], mask)`` with the rows in stream
    order. The one definition of "run the model on a chunk and keep the training positions" (live store and cache
    builder); a wrong shape raises ``error`` (default :class:`ActivationSourceError`) naming the fix."""
    with torch.no_grad():
        acts = activation_fn(ids)
    width = acts.shape[-1] if d_in is None else d_in
    if acts.dim() != 3 or tuple(acts.shape[:2]) != tuple(ids.shape) or acts.shape[-1] != width:
        raise (error or ActivationSourceError)(
            f"activation_fn returned shape {tuple(acts.shape)} for input_ids {tuple(ids.shape)}; expected "
            f"{(*ids.shape, width)} (d_in={width}). Check the hook and d_in.")
    mask = training_mask(segs, exclude_special)
    return acts[mask.to(acts.device)], mask


class ShuffleBufferSource:
    """Refill / shuffle / serve / state logic shared by the live store and the on-disk cache.

    Subclasses implement ``_read_refill() -> Tensor[n, d_in]`` (reads from ``self._cursor`` onwards and advances it)
    and ``_seek(cursor)`` (positions the underlying reader at an absolute cursor). The cursor counts the units of
    the underlying data (sequences for the live store, cache positions for the cache) and is what the state saves
    under ``_cursor_key``.
    """

    _cursor_key = "cursor_before_refill"

    def __init__(self, *, batch_size: int, buffer_tokens: int, seed: int, device: str | torch.device = "cpu"):
        if batch_size <= 0:
            raise ActivationSourceError(f"batch_size must be positive (got {batch_size}).")
        if buffer_tokens < batch_size:
            raise ActivationSourceError(
                f"buffer_tokens ({buffer_tokens}) is smaller than one batch ({batch_size}); set buffer_size_tokens "
                f"to at least train_batch_size_tokens (a few times more shuffles better).")
        self.batch_size = int(batch_size)
        self.buffer_tokens = int(buffer_tokens)
        self.seed = int(seed)
        self.device = torch.device(device)
        self._cursor = 0            # absolute position in the underlying data after everything read so far
        self._refill_start = 0      # cursor before the current refill
        self._refill_index = -1     # index of the refill in self._buffer (-1: none yet)
        self._buffer: Optional[torch.Tensor] = None
        self._n_batches = 0
        self._served = 0
        self.tokens_served = 0      # activation vectors handed out as batches (dropped leftovers not counted)

    # -- subclass hooks -------------------------------------------------------------------------------------------
    def _read_refill(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _seek(self, cursor: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _describe(self) -> str:
        return type(self).__name__

    # -- serving --------------------------------------------------------------------------------------------------
    def _refill(self) -> None:
        self._refill_start = self._cursor
        acts = self._read_refill()
        if acts.shape[0] < self.batch_size:
            self._buffer = None
            raise StopIteration
        index = self._refill_index + 1
        gen = torch.Generator().manual_seed(refill_seed(self.seed, index))
        perm = torch.randperm(acts.shape[0], generator=gen)
        self._buffer = acts[perm.to(acts.device)]
        self._refill_index = index
        self._n_batches = acts.shape[0] // self.batch_size
        self._served = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        if self._buffer is None or self._served >= self._n_batches:
            self._buffer = None
            self._refill()
        i = self._served * self.batch_size
        batch = self._buffer[i:i + self.batch_size]
        self._served += 1
        self.tokens_served += batch.shape[0]
        if self._served >= self._n_batches:
            self._buffer = None  # free the memory early; the state already points at the next refill
        return batch

    def next_batch(self) -> torch.Tensor:
        """The next ``[batch_size, d_in]`` float32 batch; :class:`SourceExhaustedError` when the data ran out."""
        try:
            return next(self)
        except StopIteration:
            raise SourceExhaustedError(
                f"{self._describe()} ran out of data after serving {self.tokens_served} tokens. Use a larger "
                f"dataset (or a repeating stream), or lower training_tokens.") from None

    def first_buffer(self) -> torch.Tensor:
        """A copy of the first refill's (shuffled) activations ``[n, d_in]``, for the activation-scale estimate and
        the b_dec initialisation. The refill is kept and then served as usual, so these tokens are trained on
        exactly once. Must be called before the second refill is read."""
        if self._refill_index == -1:
            try:
                self._refill()
            except StopIteration:
                raise SourceExhaustedError(
                    f"{self._describe()} holds fewer than one batch ({self.batch_size}) of training positions; "
                    f"nothing to train on. Check the dataset and exclude_special_tokens.") from None
        if self._refill_index != 0 or self._buffer is None:
            raise StoreStateError("first_buffer() must be called before the first refill has been fully served "
                                  "(call it right after creating the source, before training).")
        return self._buffer.clone()

    # -- state ----------------------------------------------------------------------------------------------------
    @property
    def refill_index(self) -> int:
        return self._refill_index

    def state_dict(self) -> dict[str, Any]:
        """``{<cursor key>, refill_index, batches_served, tokens_served}``; the cursor is where the refill
        ``refill_index`` starts. When the current refill is fully served, the state already names the next one."""
        if self._buffer is not None and self._served < self._n_batches:
            cursor, index, served = self._refill_start, self._refill_index, self._served
        else:
            cursor, index, served = self._cursor, self._refill_index + 1, 0
        return {self._cursor_key: int(cursor), "refill_index": int(index), "batches_served": int(served),
                "tokens_served": int(self.tokens_served), "kind": type(self).__name__}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken: seek to the refill's start, recompute it (same data, same
        permutation) and skip the batches already served."""
        aliases = {self._cursor_key, "sequences_consumed_before_refill", "cursor_before_refill"}
        key = next((k for k in state if k in aliases), None)
        if key is None or "refill_index" not in state:
            raise StoreStateError(f"Not an activation-source state for {self._describe()}: {sorted(state)}.")
        served = int(state.get("batches_served", state.get("batches_served_in_refill", 0)))
        cursor, index = int(state[key]), int(state["refill_index"])
        if (self._buffer is not None and cursor == self._refill_start and index == self._refill_index
                and served <= self._n_batches):
            # The saved refill is the one in memory (e.g. first_buffer() was called): just move the read head.
            self._served = served
            self.tokens_served = int(state.get("tokens_served", 0))
            if self._served >= self._n_batches:
                self._buffer = None
            return
        self._seek(cursor)
        self._buffer = None
        self._refill_index = int(state["refill_index"]) - 1
        self._served = self._n_batches = 0
        self.tokens_served = int(state.get("tokens_served", 0))
        if served > 0:
            try:
                self._refill()
            except StopIteration:
                raise StoreStateError(f"{self._describe()} has no data at the saved position; it is not the data "
                                      f"the checkpoint was trained on.") from None
            if served > self._n_batches:
                raise StoreStateError(
                    f"The saved state served {served} batches of refill {self._refill_index} but the recomputed "
                    f"refill holds only {self._n_batches}: the data or buffer settings differ from the "
                    f"checkpointed run.")
            self._served = served
            if self._served >= self._n_batches:
                self._buffer = None


class ActivationStore(ShuffleBufferSource):
    """Shuffled activations of the live model (see the module docstring).

    ``activation_fn(input_ids [b, ctx]) -> Tensor [b, ctx, d_in]`` (the pipeline wraps
    ``models.hooks.capture``); ``token_stream`` yields ``(input_ids [ctx], segments [ctx])`` and, for fast resume,
    has ``skip(n_sequences)`` (called before iteration starts; a stream without it is advanced by reading).
    """

    _cursor_key = "sequences_before_refill"

    def __init__(self, activation_fn: Callable[[torch.Tensor], torch.Tensor], token_stream: Iterable, *,
                 d_in: int, batch_size: int, buffer_tokens: int, model_batch_size: int = 8,
                 exclude_special: bool = True, seed: int = 0, device: str | torch.device = "cpu"):
        super().__init__(batch_size=batch_size, buffer_tokens=buffer_tokens, seed=seed, device=device)
        if model_batch_size <= 0:
            raise ActivationSourceError(f"model_batch_size must be positive (got {model_batch_size}).")
        self.activation_fn = activation_fn
        self.token_stream = token_stream
        self.d_in = int(d_in)
        self.model_batch_size = int(model_batch_size)
        self.exclude_special = bool(exclude_special)
        self._it: Optional[Iterator] = None

    @property
    def sequences_consumed(self) -> int:
        """Sequences read from the token stream so far (including skipped ones when resuming)."""
        return self._cursor

    def _describe(self) -> str:
        return "The activation store's token stream"

    def _iterator(self) -> Iterator:
        if self._it is None:
            self._it = iter(self.token_stream)
        return self._it

    def _seek(self, cursor: int) -> None:
        if cursor < self._cursor:
            raise StoreStateError(
                f"Cannot rewind the token stream from sequence {self._cursor} to {cursor}; restore the state on a "
                f"freshly created store (before reading any batch).")
        if cursor == self._cursor:
            return
        if self._it is None and isinstance(self.token_stream, SkippableStream):
            self.token_stream.skip(cursor - self._cursor)
        else:
            it = self._iterator()
            for _ in range(cursor - self._cursor):
                try:
                    next(it)
                except StopIteration:
                    raise StoreStateError(f"The token stream ended before sequence {cursor}; it is not the data "
                                          f"the checkpoint was trained on.") from None
        self._cursor = cursor

    def _read_refill(self) -> torch.Tensor:
        kept: list[torch.Tensor] = []
        n_kept = 0
        while n_kept < self.buffer_tokens:
            chunk = read_sequences(self._iterator(), self.model_batch_size)
            if chunk is None:
                break
            self._cursor += chunk[0].shape[0]
            acts, _ = kept_activations(self.activation_fn, *chunk, d_in=self.d_in,
                                       exclude_special=self.exclude_special)
            sel = acts.to(self.device, torch.float32)
            kept.append(sel)
            n_kept += sel.shape[0]
        if not kept:
            return torch.empty(0, self.d_in, device=self.device)
        return torch.cat(kept)
