"""Hook points: resolve a name to a module, capture its activation (stopping the forward pass there), or patch it.

Names accepted by :func:`resolve_hook`:

* any module path of ``model.named_modules()`` (``model.layers.3.mlp``, ``transformer.h.0.mlp``): the module's
  output (its first element when the module returns a tuple);
* TransformerLens-style names. With ``h_L`` the residual stream entering decoder layer ``L`` (``h_0`` = the
  embeddings), ``A_L`` what the attention sub-block adds to it and ``M_L`` what the MLP sub-block adds:

  ==========================  ==================================  ==============================================
  name                        value                               hooked as
  ==========================  ==================================  ==============================================
  ``blocks.L.hook_resid_pre``   ``h_L`` (= ``hidden_states[L]``)    input ``hidden_states`` of decoder layer L
  ``blocks.L.hook_attn_out``    ``A_L``                             output[0] of the attention module
  ``blocks.L.hook_resid_mid``   ``h_L + A_L``                       input of the pre-MLP layer norm
  ``blocks.L.hook_mlp_out``     ``M_L``                             output of the MLP module
  ``blocks.L.hook_resid_post``  ``h_{L+1}`` = ``h_L + A_L + M_L``   output[0] of decoder layer L
  ==========================  ==================================  ==============================================

  ``hidden_states[L + 1]`` equals ``resid_post`` of layer L except for the last layer, whose ``hidden_states``
  entry has the final norm applied. Layouts: Llama/Qwen2/Qwen3/Mistral/Gemma/Phi-3 (``model.layers.L`` with
  ``self_attn``, ``mlp``, ``post_attention_layernorm``), GPT-2 (``transformer.h.L`` with ``attn``, ``mlp``,
  ``ln_2``), GPT-NeoX (``gpt_neox.layers.L`` with ``attention``, ``mlp``, ``post_attention_layernorm``); for
  sandwich-norm layers (Gemma-2/3, OLMo-2) ``attn_out``/``mlp_out`` are the outputs of the post-attention /
  post-feed-forward norms (what is added to the residual) and ``resid_mid`` the input of the pre-feed-forward norm
  (of the MLP for OLMo-2). Other families: the decoder-layer ``ModuleList`` and its children are found by shape
  and common names. Parallel-residual models (GPT-NeoX with ``use_parallel_residual``, GPT-J, Phi, Falcon,
  Cohere) have no ``resid_mid``: there ``h_{L+1} = h_L + A_L + M_L`` with both sub-blocks reading ``h_L``.
"""

from __future__ import annotations

import difflib
import re
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Optional

import torch
from torch import nn

from ..errors import UserError

TL_KINDS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")
_TL_RE = re.compile(r"^blocks\.(\d+)\.(" + "|".join(TL_KINDS) + r")$")

# Where the decoder layers live, tried in order before the generic search.
_LAYER_LIST_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers",
                     "transformer.layers", "model.language_model.layers", "language_model.model.layers")
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
_MID_NORM_NAMES = ("post_attention_layernorm", "ln_2", "ln2", "ffn_norm", "ln_mlp")
_PARALLEL_TYPES = {"gptj", "phi", "cohere", "codegen"}


class HookError(UserError, ValueError):
    """Unknown or unsupported hook name, or a hook that cannot run; the message lists valid names."""


@dataclass(frozen=True)
class HookPoint:
    """Where an activation is read or written: the ``output`` (first element if a tuple) or the first ``input``
    (``hidden_states``) of the module at ``module_path``."""
    name: str                         # as given by the user
    module_path: str                  # the module the hook attaches to
    kind: Literal["output", "input"]  # its output, or its first input (hidden_states)
    layer: Optional[int] = None       # decoder layer for TransformerLens-style names


@dataclass(frozen=True)
class _Layout:
    layers: str                                   # path of the decoder-layer ModuleList
    attn_out: Optional[tuple[str, str]]           # (child, kind) giving A_L
    mlp_out: Optional[tuple[str, str]]            # (child, kind) giving M_L
    resid_mid: Optional[tuple[str, str]]          # (child, kind) giving h_L + A_L
    parallel: bool


class _StopForward(Exception):
    """Raised inside a hook to end the forward pass once the activation is captured."""


# ----------------------------------------------------------------------------------------------------------------
# Resolution

def _config(model: nn.Module):
    cfg = getattr(model, "config", None)
    getter = getattr(cfg, "get_text_config", None)
    return getter() if callable(getter) else cfg


def _n_layers(model: nn.Module) -> int:
    cfg = _config(model)
    for attr in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return 0


def _is_parallel(model: nn.Module) -> bool:
    cfg = _config(model)
    if getattr(cfg, "model_type", "") in _PARALLEL_TYPES:
        return True
    if getattr(cfg, "model_type", "") == "falcon" and getattr(cfg, "new_decoder_architecture", False):
        return True
    return any(getattr(cfg, a, False) is True for a in ("use_parallel_residual", "parallel_attn", "parallel_residual"))


def _find_layer_list(model: nn.Module, modules: dict[str, nn.Module]) -> str:
    n = _n_layers(model)
    for path in _LAYER_LIST_PATHS:
        mod = modules.get(path)
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n == 0 or len(mod) == n):
            return path
    # Generic fallback: the first (outermost) ModuleList of identical blocks whose length is the layer count, or,
    # when the config does not say, the longest such list.
    best: Optional[tuple[int, str]] = None
    for path, mod in modules.items():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or len({type(m) for m in mod}) != 1:
            continue
        if n and len(mod) == n:
            return path
        if not n and (best is None or len(mod) > best[0]):
            best = (len(mod), path)
    if best is not None:
        return best[1]
    raise HookError(f"Could not find the decoder layers of this {type(model).__name__}, so TransformerLens-style "
                    f"names (blocks.L.hook_...) are not available; use a module path from model.named_modules() as "
                    f"the hook name instead.")


def _layout(model: nn.Module) -> _Layout:
    modules = dict(model.named_modules())
    layers = _find_layer_list(model, modules)
    children = dict(modules[layers][0].named_children())
    attn = next((c for c in _ATTN_NAMES if c in children), None)
    mlp = next((c for c in _MLP_NAMES if c in children), None)
    parallel = _is_parallel(model)
    if "post_feedforward_layernorm" in children and "post_attention_layernorm" in children:
        # sandwich norms (Gemma-2/3, OLMo-2): the post-norms' outputs are what is added to the residual stream
        attn_out = ("post_attention_layernorm", "output")
        mlp_out = ("post_feedforward_layernorm", "output")
        if "pre_feedforward_layernorm" in children:
            mid = ("pre_feedforward_layernorm", "input")
        else:
            mid = (mlp, "input") if mlp else None
    else:
        attn_out = (attn, "output") if attn else None
        mlp_out = (mlp, "output") if mlp else None
        norm = next((c for c in _MID_NORM_NAMES if c in children), None)
        mid = (norm, "input") if norm and not parallel else None
    return _Layout(layers, attn_out, mlp_out, None if parallel else mid, parallel)


def list_hook_names(model: nn.Module, *, with_hint: bool = False) -> list[str]:
    """TransformerLens-style names valid for ``model`` (layer by layer, in forward order). Any module path from
    ``model.named_modules()`` is valid too; ``with_hint=True`` appends a line saying so (for display)."""
    try:
        lay = _layout(model)
        n = len(dict(model.named_modules())[lay.layers])
    except HookError:
        lay, n = None, 0
    kinds = [k for k in TL_KINDS if lay is not None and _spec_for(lay, k) is not None]
    names = [f"blocks.{L}.{k}" for L in range(n) for k in kinds]
    if with_hint:
        names.append(f"(or any module path from model.named_modules(), e.g. {_example_paths(model)})")
    return names


def _spec_for(lay: _Layout, kind: str) -> Optional[tuple[str, str]]:
    return {"hook_resid_pre": ("", "input"), "hook_resid_post": ("", "output"), "hook_attn_out": lay.attn_out,
            "hook_mlp_out": lay.mlp_out, "hook_resid_mid": lay.resid_mid}[kind]


def _example_paths(model: nn.Module) -> str:
    paths = [p for p, _ in model.named_modules() if p.endswith((".mlp", ".self_attn", ".attn", ".attention"))][:2]
    return ", ".join(paths) or next((p for p, _ in model.named_modules() if p), "<module path>")


def valid_names_message(model: nn.Module, wrong: Optional[str] = None) -> str:
    """One paragraph naming the valid hooks of ``model`` (and the closest matches to ``wrong``)."""
    names = list_hook_names(model)
    parts = []
    if wrong:
        close = difflib.get_close_matches(wrong, names + [p for p, _ in model.named_modules() if p], n=3, cutoff=0.75)
        if close:
            parts.append(f"Did you mean {' or '.join(close)}?")
    if names:
        n = max(int(x.split(".")[1]) for x in names) + 1
        kinds = sorted({x.split(".", 2)[2] for x in names}, key=TL_KINDS.index)
        parts.append(f"Valid names for this {getattr(_config(model), 'model_type', type(model).__name__)} model: "
                     f"blocks.L.{{{', '.join(kinds)}}} with L in 0..{n - 1} (e.g. blocks.{n // 2}.hook_resid_post), "
                     f"or any module path from model.named_modules() (e.g. {_example_paths(model)}).")
    else:
        parts.append(f"Valid names: any module path from model.named_modules() (e.g. {_example_paths(model)}).")
    return " ".join(parts)


def as_hook(model: nn.Module, hook: "str | HookPoint") -> HookPoint:
    """``hook`` itself when already resolved, else :func:`resolve_hook` on ``model``."""
    return hook if isinstance(hook, HookPoint) else resolve_hook(model, hook)


def resolve_hook(model: nn.Module, name: str) -> HookPoint:
    """Map ``name`` to a :class:`HookPoint` on ``model`` or raise :class:`HookError` listing valid names."""
    if not isinstance(name, str) or not name:
        raise HookError(f"Empty hook name. {valid_names_message(model)}")
    modules = dict(model.named_modules())
    if name in modules:
        return HookPoint(name=name, module_path=name, kind="output")
    m = _TL_RE.match(name)
    if not m:
        raise HookError(f"Hook '{name}' does not exist in this model. {valid_names_message(model, name)}")
    layer, kind = int(m.group(1)), m.group(2)
    lay = _layout(model)
    n = len(modules[lay.layers])
    if layer >= n:
        raise HookError(f"Hook '{name}' asks for layer {layer}, but the model has {n} layers (0..{n - 1}). "
                        f"{valid_names_message(model)}")
    spec = _spec_for(lay, kind)
    if spec is None:
        if kind == "hook_resid_mid" and lay.parallel:
            raise HookError(f"Hook '{name}' does not exist: this model uses a parallel residual (attention and MLP "
                            f"both read the layer input), so there is no residual stream between them. Use "
                            f"blocks.{layer}.hook_resid_pre or blocks.{layer}.hook_resid_post.")
        children = ", ".join(dict(modules[lay.layers][layer].named_children()))
        raise HookError(f"Hook '{name}' is not available: no {kind[5:].replace('_', ' ')} sub-module was found in "
                        f"{lay.layers}.{layer} (children: {children})."
                        f" Hook one of those module paths directly. {valid_names_message(model)}")
    child, hook_kind = spec
    path = f"{lay.layers}.{layer}" + (f".{child}" if child else "")
    if path not in modules:
        raise HookError(f"Hook '{name}' maps to module '{path}', which this model does not have. "
                        f"{valid_names_message(model)}")
    return HookPoint(name=name, module_path=path, kind=hook_kind, layer=layer)


def _module(model: nn.Module, hook: HookPoint) -> nn.Module:
    try:
        return model.get_submodule(hook.module_path)
    except AttributeError:
        raise HookError(f"Hook '{hook.name}' points at module '{hook.module_path}', which this model does not have "
                        f"(was it resolved on another model?). {valid_names_message(model)}") from None


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
def _hooked(model: nn.Module, hook: HookPoint,
            fn: Callable[[torch.Tensor], Optional[torch.Tensor]]) -> Iterator[None]:
    """Attach ``fn`` to the hook point for the duration of the block; ``fn(activation)`` may return a replacement
    tensor. The hook is removed on exit, also when the forward pass raises."""
    module = _module(model, hook)
    if hook.kind == "output":
        def out_hook(mod, args, output):
            a = _first(output)
            if not isinstance(a, torch.Tensor):
                raise HookError(f"Module '{hook.module_path}' returned {type(a).__name__}, not a tensor; choose "
                                f"another hook.")
            new = fn(a)
            return None if new is None else _replace_first(output, new)
        handle = module.register_forward_hook(out_hook)
    else:
        def in_hook(mod, args, kwargs):
            if args and isinstance(args[0], torch.Tensor):
                new = fn(args[0])
                return None if new is None else ((new,) + tuple(args[1:]), kwargs)
            if isinstance(kwargs.get("hidden_states"), torch.Tensor):
                new = fn(kwargs["hidden_states"])
                return None if new is None else (args, {**kwargs, "hidden_states": new})
            raise HookError(f"Module '{hook.module_path}' was called without a hidden_states tensor, so hook "
                            f"'{hook.name}' cannot read its input; hook a module output instead.")
        handle = module.register_forward_pre_hook(in_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _call(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]):
    kw = {"use_cache": False}
    if attention_mask is not None:
        kw["attention_mask"] = attention_mask
    return model(input_ids=input_ids, **kw)


@torch.no_grad()
def capture(model: nn.Module, hook: HookPoint, input_ids: torch.Tensor,
            attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Activation at ``hook`` [B, T, d], without gradients. The forward pass is stopped right after the hooked
    module by raising a private exception from the hook, so later layers (and the unembedding) never run."""
    store: dict[str, torch.Tensor] = {}

    def grab(a: torch.Tensor):
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
def capture_many(model: nn.Module, hooks: "list[HookPoint]", input_ids: torch.Tensor,
                 attention_mask: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Activations at several hooks ``{hook.name: [B, T, d]}`` from ONE forward pass, without gradients, stopped
    as soon as the last of them (the deepest) has been reached. Every activation but the last is cloned, so
    in-place operations of later layers cannot change it."""
    store: dict[str, torch.Tensor] = {}
    wanted = {h.name for h in hooks}

    def grabber(name: str):
        def grab(a: torch.Tensor):
            store[name] = a.detach()
            if wanted.issubset(store):
                raise _StopForward
            store[name] = store[name].clone()
            return None
        return grab

    with ExitStack() as stack:
        for h in hooks:
            stack.enter_context(_hooked(model, h, grabber(h.name)))
        try:
            _call(model, input_ids, attention_mask)
        except _StopForward:
            pass
    missing = sorted(wanted - set(store))
    if missing:
        raise HookError(f"Hook(s) {', '.join(missing)} were never reached during the forward pass.")
    return store


@torch.no_grad()
def forward_with_capture(model: nn.Module, hook: HookPoint, input_ids: torch.Tensor,
                         attention_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One full forward pass: (logits [B, T, V], activation at the hook [B, T, d]), without gradients. The
    activation is cloned so later in-place operations of the model cannot change it."""
    store: dict[str, torch.Tensor] = {}

    def grab(a: torch.Tensor):
        store["a"] = a.detach().clone()
        return None

    with _hooked(model, hook, grab):
        logits = _call(model, input_ids, attention_mask).logits
    if "a" not in store:
        raise HookError(f"Hook '{hook.name}' ({hook.module_path}) was never reached during the forward pass.")
    return logits, store["a"]


def forward_with_patch(model: nn.Module, hook: HookPoint, input_ids: torch.Tensor,
                       patch_fn: Callable[[torch.Tensor], torch.Tensor],
                       attention_mask: Optional[torch.Tensor] = None, *, grad: bool = False) -> torch.Tensor:
    """Logits [B, T, V] of a full forward pass in which the hook's activation ``a`` is replaced by ``patch_fn(a)``
    (same shape; cast to ``a``'s dtype and device). The hook is removed afterwards, also when anything raises.
    Without gradients, unless ``grad``: then they flow from the logits into what ``patch_fn`` returned."""
    with torch.set_grad_enabled(grad), _hooked(model, hook, checked_patch(hook, patch_fn)):
        return _call(model, input_ids, attention_mask).logits


def checked_patch(hook: HookPoint, patch_fn: Callable[[torch.Tensor], torch.Tensor]
                  ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``patch_fn`` as a hook replacement: its result must have the activation's shape (else :class:`HookError`)
    and is cast to the activation's dtype and device."""
    def patch(a: torch.Tensor) -> torch.Tensor:
        new = patch_fn(a)
        if not isinstance(new, torch.Tensor) or new.shape != a.shape:
            got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise HookError(f"The patch for hook '{hook.name}' returned {got}, expected a tensor of shape "
                            f"{tuple(a.shape)}.")
        return new.to(device=a.device, dtype=a.dtype)
    return patch


def hook_d_in(model: nn.Module, hook: HookPoint) -> int:
    """Width d of the activation at ``hook`` (read from a 2-token truncated forward pass, so any module works)."""
    device = next(model.parameters()).device
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    return int(capture(model, hook, ids).shape[-1])
