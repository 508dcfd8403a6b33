"""Incremental (KV-cached) forward passes with a patched hook, for generation: one step feeds only the new tokens."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn

from .hooks import HookPoint, _hooked, checked_patch, forward_with_patch

__all__ = ["forward_with_patch_cached"]


def _forward_parameters(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


@torch.no_grad()
def forward_with_patch_cached(model: nn.Module, hook: HookPoint, input_ids: torch.Tensor,
                              patch_fn: Callable[[torch.Tensor], torch.Tensor], cache: Any = None
                              ) -> tuple[torch.Tensor, Any]:
    """One incremental step with a KV cache: ``(logits of the last position [B, V], updated cache)`` for the new
    tokens ``input_ids`` [B, n] after the positions already in ``cache`` (None: the first step, over the prompt). The
    patch sees the hook's activation of the new positions only, so the result equals :func:`forward_with_patch` on
    the whole sequence exactly when ``patch_fn`` acts on each position independently. Returns ``(logits, None)``
    after a full forward when the model takes no cache (the caller then passes the whole sequence each step)."""
    params = _forward_parameters(model)
    # the KV cache's name: transformers 5 ``cache``, 4 ``past_key_values``
    name = next((n for n in ("cache", "past_key_values") if n in params), None)
    if name is None or "use_cache" not in params:
        return forward_with_patch(model, hook, input_ids, patch_fn)[:, -1], None
    kw: dict[str, Any] = {"use_cache": True}
    if cache is not None:
        kw[name] = cache
    if "logits_to_keep" in params:
        kw["logits_to_keep"] = 1
    with _hooked(model, hook, checked_patch(hook, patch_fn)):
        out = model(input_ids=input_ids, **kw)
    new_cache = getattr(out, "cache", None)
    return out.logits[:, -1], new_cache if new_cache is not None else getattr(out, "past_key_values", None)
