"""The activation-source interface every SAE trainer reads from.

Implemented by :class:`~.store.ActivationStore` (the live model), :class:`~.cache.CachedActivationSource` (an
on-disk cache) and :class:`~.mixture.MixtureSource` (exact shares of several sources); tests use small synthetic
ones. A source is an endless (or exhausting, raising :class:`~.store.SourceExhaustedError`) iterator of float32
``[batch_size, d_in]`` batches with a state for exact resume: after ``load_state_dict(state_dict())`` on a fresh
source, the batches served are those an uninterrupted source would have served next.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol, runtime_checkable

import torch


@runtime_checkable
class ActivationSource(Protocol):
    def __iter__(self) -> Iterator[torch.Tensor]: ...

    def __next__(self) -> torch.Tensor: ...

    def next_batch(self) -> torch.Tensor:
        """The next ``[batch_size, d_in]`` float32 batch (same as ``next(source)``)."""
        ...

    def first_buffer(self) -> torch.Tensor:
        """The rows of the first refill (for the scaling estimate and b_dec init; they are still trained on once)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
