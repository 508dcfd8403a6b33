"""What the evaluation splices into the model: the SAE's reconstruction and the patch that puts a value at the
splice positions (the forward passes themselves are :func:`domain_sae.models.hooks.forward_with_capture` and
:func:`~domain_sae.models.hooks.forward_with_patch`).

A patch replaces the hook's activation ``a`` [B, T, d] by ``where(mask, value, a)``: ``value`` at the splice
positions ``mask`` [B, T] (:func:`.positions.splice_positions`), the original activation elsewhere.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .metrics import MetricError

__all__ = ["replace_at", "reconstruct", "sae_widths"]


def replace_at(value: Tensor, mask: Tensor) -> Callable[[Tensor], Tensor]:
    """Patch ``a -> where(mask[..., None], value, a)``; ``value`` has the activation's shape or is a [d_in] vector."""
    def patch(a: Tensor) -> Tensor:
        if value.shape != a.shape and value.shape != a.shape[-1:]:
            raise MetricError(f"replacement {tuple(value.shape)} does not match the hook's activation "
                              f"{tuple(a.shape)}.")
        v = value.to(device=a.device, dtype=a.dtype).expand_as(a)
        return torch.where(mask.to(a.device)[..., None], v, a)
    return patch


def sae_widths(sae: Any) -> tuple[int, int]:
    """(d_in, d_sae) from the decoder ``W_dec`` [d_sae, d_in] every SAE architecture has (SPEC section 4)."""
    d_sae, d_in = sae.W_dec.shape
    return int(d_in), int(d_sae)


def reconstruct(sae: Any, a: Tensor) -> tuple[Tensor, Tensor]:
    """(x̂ [..., d_in] on a's device, f [..., d_sae]) for activations ``a``."""
    d_in, _ = sae_widths(sae)
    if d_in != a.shape[-1]:
        raise MetricError(f"The SAE takes d_in={d_in} but the hook's activation has width {a.shape[-1]}: this SAE "
                          f"was trained at another hook or on another model. Evaluate it at its own hook/model.")
    x = a.to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)
    f = sae.encode(x)
    x_hat = sae.decode(f)
    return x_hat.to(a.device), f.to(a.device)
