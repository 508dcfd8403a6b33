"""Language models: loading (:mod:`.load`: the :class:`LanguageModel` protocol, :class:`LoadedModel`,
:func:`as_module`, the one way to unwrap), hook points for reading/patching activations (:mod:`.hooks`) and
KV-cached patched steps for generation (:mod:`.incremental`)."""

from .hooks import (HookError, HookPoint, as_hook, capture, forward_with_capture, forward_with_patch, hook_d_in,
                    list_hook_names, resolve_hook)
from .incremental import forward_with_patch_cached
from .names import normalise_model_name, same_model_name
from .load import (LanguageModel, LoadedModel, ModelLoadError, ModelOrModule, as_module, load_model, max_context,
                   resolve_device, tokenizer_of)

__all__ = ["HookError", "HookPoint", "LanguageModel", "LoadedModel", "ModelLoadError", "ModelOrModule", "as_hook",
           "as_module", "capture", "forward_with_capture", "forward_with_patch", "forward_with_patch_cached",
           "hook_d_in", "list_hook_names", "load_model", "max_context", "normalise_model_name", "resolve_device",
           "resolve_hook", "same_model_name", "tokenizer_of"]
