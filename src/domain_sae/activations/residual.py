"""Residual activations: what a frozen SAE fails to reconstruct, as an activation source.

    r = x - reconstruct(x)            (reconstruct: e.g. a frozen general SAE's forward, x -> x_hat)

:class:`ResidualSource` wraps any activation source (live store, cache, mixture) and serves ``r`` for each of its
batches, so that a small SAE can be trained on a domain's reconstruction error of a general SAE (the "residual SAE"
baseline: general + residual together reconstruct ``x_hat_general + residual(r)``). ``reconstruct`` runs under
``torch.no_grad()`` on the batch's device, in chunks of ``chunk_tokens`` rows; its output is cast back to the
batch's dtype. The wrapper's state is the wrapped source's state, so resuming is exactly as exact as the source.

This module imports nothing above ``activations``: ``reconstruct`` is any callable (an SAE module works as is).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .live import StoreStateError

__all__ = ["ResidualSource", "residual_of"]


@torch.no_grad()
def residual_of(x: torch.Tensor, reconstruct: Callable[[torch.Tensor], torch.Tensor],
                chunk_tokens: int = 8192) -> torch.Tensor:
    """``x - reconstruct(x)`` for ``x`` [n, d_in], computed in chunks of ``chunk_tokens`` rows."""
    parts = []
    for i in range(0, x.shape[0], chunk_tokens):
        xb = x[i:i + chunk_tokens]
        x_hat = reconstruct(xb)
        if x_hat.shape != xb.shape:
            raise ValueError(f"reconstruct returned shape {tuple(x_hat.shape)} for a batch of shape "
                             f"{tuple(xb.shape)}; it must map [n, d_in] to [n, d_in] (an SAE of this hook's width).")
        parts.append(xb - x_hat.to(device=xb.device, dtype=xb.dtype))
    return torch.cat(parts) if parts else x.clone()


class ResidualSource:
    """Batches ``x - reconstruct(x)`` of ``source`` (same iterator / ``next_batch`` / ``first_buffer`` / state
    interface as the activation sources)."""

    def __init__(self, source: Any, reconstruct: Callable[[torch.Tensor], torch.Tensor], *, chunk_tokens: int = 8192):
        self.source = source
        self.reconstruct = reconstruct
        self.chunk_tokens = int(chunk_tokens)

    def __iter__(self) -> "ResidualSource":
        return self

    def __next__(self) -> torch.Tensor:
        return residual_of(next(self.source), self.reconstruct, self.chunk_tokens)

    def next_batch(self) -> torch.Tensor:
        return residual_of(self.source.next_batch(), self.reconstruct, self.chunk_tokens)

    def first_buffer(self) -> torch.Tensor:
        return residual_of(self.source.first_buffer(), self.reconstruct, self.chunk_tokens)

    def state_dict(self) -> dict:
        return {"residual_of": self.source.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "residual_of" not in state:
            raise StoreStateError(f"Not a ResidualSource state (keys {sorted(state)}); resume with the source the run "
                             f"was trained on.")
        self.source.load_state_dict(state["residual_of"])
