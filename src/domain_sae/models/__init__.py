"""Language models: loading (:mod:`.load`) and hook points for reading/patching activations (:mod:`.hooks`)."""

from .hooks import (HookError, HookPoint, capture, forward_with_capture, forward_with_patch, hook_d_in,
                    list_hook_names, resolve_hook)
from .load import LoadedModel, ModelLoadError, load_model, max_context, resolve_device

__all__ = ["HookError", "HookPoint", "LoadedModel", "ModelLoadError", "capture", "forward_with_capture",
           "forward_with_patch", "hook_d_in", "list_hook_names", "load_model", "max_context", "resolve_device",
           "resolve_hook"]
