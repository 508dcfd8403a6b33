"""Hook points: resolve a name to a module, capture its activation (stopping the forward pass there), or patch it.

Names accepted by :func:`resolve_hook`:

* any module path of ``model.named_modules()`` (``model.layers.3.mlp``, ``transformer.h.0.mlp``): the module's
  output (first element when the module returns a tuple);
* TransformerLens-style names, mapped per family (Llama/Qwen2/Mistral/Gemma/Phi-3: ``model.layers.L``;
  GPT-2: ``transformer.h.L``; GPT-NeoX: ``gpt_neox.layers.L``; other families: the decoder-layer ModuleList is found
  by its length):

  ==========================  ================================================================
  ``blocks.L.hook_resid_pre``   input hidden states of decoder layer L (= ``hidden_states[L]``)
  ``blocks.L.hook_resid_mid``   input of layer L's second layer norm (after the attention residual)
  ``blocks.L.hook_resid_post``  output hidden states of layer L (= ``hidden_states[L+1]``)
  ``blocks.L.hook_mlp_out``     output of layer L's MLP
  ``blocks.L.hook_attn_out``    output of layer L's attention (before the residual add)
  ==========================  ================================================================
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
from torch import nn

from ..errors import UserError

TL_KINDS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_out", "hook_attn_out")
_TL_RE = re.compile(r"^blocks\.(\d+)\.(" + "|".join(TL_KINDS) + r")$")

# Per family: (path of the decoder-layer ModuleList, mlp child, attention child, second-layernorm child)
FAMILIES = {
    "gpt2": ("transformer.h", "mlp", "attn", "ln_2"),
    "gpt_neox": ("gpt_neox.layers", "mlp", "attention", "post_attention_layernorm"),
}
_DEFAULT_LAYOUT = ("model.layers", "mlp", "self_attn", "post_attention_layernorm")  # Llama, Qwen2, Mistral, ...


class HookError(UserError, ValueError):
    """Unknown or unsupported hook name; the message lists valid names."""


@dataclass(frozen=True)
class HookPoint:
    name: str                         # as given by the user
    module_path: str                  # the module the hook attaches to
    kind: Literal["output", "input"]  # its output, or its first input (hidden_states)
    layer: Optional[int] = None


class _StopForward(Exception):
    """Raised inside a hook to end the forward pass once the activation is captured."""


# ----------------------------------------------------------------------------------------------------------------
# Resolution

def _layers_path(model: nn.Module) -> tuple[str, str, str, str]:
    family = getattr(getattr(model, "config", None), "model_type", "")
    modules = dict(model.named_modules())
    layout = FAMILIES.get(family, _DEFAULT_LAYOUT)
    if layout[0] in modules:
        return layout
    # Generic fallback: the ModuleList whose length is the number of layers.
    n = _n_layers(model)
    for path, mod in modules.items():
        if isinstance(mod, nn.ModuleList) and len(mod) == n and n > 0:
            children = dict(mod[0].named_children())
            mlp = next((c for c in ("mlp", "feed_forward", "ffn") if c in children), "mlp")
            attn = next((c for c in ("self_attn", "attn", "attention", "self_attention") if c in children), "self_attn")
            ln2 = next((c for c in ("post_attention_layernorm", "ln_2", "ln2", "ffn_norm") if c in children),
                       "post_attention_layernorm")
            return path, mlp, attn, ln2
    raise HookError(f"Could not find the decoder layers of this {family or type(model).__name__} model; use a module "
                    f"path from model.named_modules() as the hook name instead.")


def _n_layers(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int):
            return v
    return 0


def list_hook_names(model: nn.Module) -> list[str]:
    """TransformerLens-style names valid for this model (any module path is valid too)."""
    return [f"blocks.{L}.{k}" for L in range(_n_layers(model)) for k in TL_KINDS]


def _valid_names_message(model: nn.Module) -> str:
    n = _n_layers(model)
    examples = [p for p, _ in model.named_modules() if p.endswith(".mlp")][:2]
    return (f"Valid names: blocks.L.{{{','.join(k[5:] for k in TL_KINDS)}}} with L in 0..{n - 1} "
            f"(e.g. blocks.0.hook_mlp_out), prefixed 'hook_'; or any module path such as "
            f"{', '.join(examples) or 'model.layers.0.mlp'}.")


def resolve_hook(model: nn.Module, name: str) -> HookPoint:
    """Map ``name`` to a :class:`HookPoint` on ``model`` or raise :class:`HookError` listing valid names."""
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return HookPoint(name=name, module_path=name, kind="output")
    m = _TL_RE.match(name)
    if not m:
        raise HookError(f"Hook '{name}' does not exist in this model. {_valid_names_message(model)}")
    layer, kind = int(m.group(1)), m.group(2)
    n = _n_layers(model)
    if n and layer >= n:
        raise HookError(f"Hook '{name}' asks for layer {layer}, but the model has {n} layers (0..{n - 1}). "
                        f"{_valid_names_message(model)}")
    layers, mlp, attn, ln2 = _layers_path(model)
    block = f"{layers}.{layer}"
    if kind == "hook_resid_pre":
        hp = HookPoint(name, block, "input", layer)
    elif kind == "hook_resid_post":
        hp = HookPoint(name, block, "output", layer)
    elif kind == "hook_mlp_out":
        hp = HookPoint(name, f"{block}.{mlp}", "output", layer)
    elif kind == "hook_attn_out":
        hp = HookPoint(name, f"{block}.{attn}", "output", layer)
    else:  # hook_resid_mid
        if getattr(getattr(model, "config", None), "use_parallel_residual", False):
            raise HookError(f"Hook '{name}' does not exist: this model uses a parallel residual (attention and MLP "
                            f"read the same input), so there is no residual stream between them. Use "
                            f"blocks.{layer}.hook_resid_pre or hook_resid_post.")
        hp = HookPoint(name, f"{block}.{ln2}", "input", layer)
    if hp.module_path not in modules:
        raise HookError(f"Hook '{name}' maps to module '{hp.module_path}', which this model does not have. "
                        f"{_valid_names_message(model)}")
    return hp


# ----------------------------------------------------------------------------------------------------------------
# Running

def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _replace_first(x, new):
    if isinstance(x, tuple):
        return (new,) + tuple(x[1:])
    if isinstance(x, list):
        return [new] + list(x[1:])
    return new


@contextmanager
def _hooked(model: nn.Module, hook: HookPoint, fn: Callable[[torch.Tensor], Optional[torch.Tensor]]):
    """Attach ``fn`` to the hook point; ``fn(activation)`` may return a replacement tensor. Always removed."""
    module = dict(model.named_modules())[hook.module_path]
    if hook.kind == "output":
        def out_hook(mod, args, output):
            new = fn(_first(output))
            return None if new is None else _replace_first(output, new)
        handle = module.register_forward_hook(out_hook)
    else:
        def in_hook(mod, args, kwargs):
            if args:
                new = fn(args[0])
                return None if new is None else ((new,) + tuple(args[1:]), kwargs)
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})
        handle = module.register_forward_pre_hook(in_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _call(model, input_ids, attention_mask):
    kw = {"use_cache": False}
    if attention_mask is not None:
        kw["attention_mask"] = attention_mask
    return model(input_ids=input_ids, **kw)


@torch.no_grad()
def capture(model: nn.Module, hook: HookPoint, input_ids: torch.Tensor,
            attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Activation at ``hook`` [B, T, d]; the forward pass stops right after it (later layers never run)."""
    store: dict[str, torch.Tensor] = {}

    def grab(a):
        store["a"] = a.detach()
        raise _StopForward

    with _hooked(model, hook, grab):
        try:
            _call(model, input_ids, attention_mask)
        except _StopForward:
            pass
    if "a" not in store:
        raise HookError(f"Hook '{hook.name}' ({hook.module_path}) was never reached during the forward pass.")
    return store["a"]


@torch.no_grad()
def forward_with_capture(model: nn.Module, hook: HookPoint, input_ids: torch.Tensor,
                         attention_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One full forward pass: (logits [B, T, V], activation at the hook [B, T, d])."""
    store: dict[str, torch.Tensor] = {}

    def grab(a):
        store["a"] = a.detach()
        return None

    with _hooked(model, hook, grab):
        logits = _call(model, input_ids, attention_mask).logits
    return logits, store["a"]


@torch.no_grad()
def forward_with_patch(model: nn.Module, hook: HookPoint, input_ids: torch.Tensor,
                       patch_fn: Callable[[torch.Tensor], torch.Tensor],
                       attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Logits [B, T, V] of a forward pass where the hook's activation a is replaced by ``patch_fn(a)``."""
    def patch(a):
        new = patch_fn(a)
        if new.shape != a.shape:
            raise HookError(f"The patch for hook '{hook.name}' returned shape {tuple(new.shape)}, expected "
                            f"{tuple(a.shape)}.")
        return new.to(a.dtype)

    with _hooked(model, hook, patch):
        return _call(model, input_ids, attention_mask).logits


def hook_d_in(model: nn.Module, hook: HookPoint) -> int:
    """Width of the activation at ``hook`` (found by a 2-token truncated forward pass)."""
    device = next(model.parameters()).device
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    return int(capture(model, hook, ids).shape[-1])
