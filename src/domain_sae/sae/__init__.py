"""Sparse autoencoders: the standard (ReLU + L1) SAE, its initialisation and SAELens-compatible save/load.

Imports are lazy so that ``import domain_sae.sae`` stays cheap and never pulls optional packages.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "SAEModelConfig": ".standard", "StandardSAE": ".standard", "LossOutput": ".standard",
    "SAECompatibilityError": ".standard", "check_compatible": ".standard",
    "initialize": ".init", "geometric_median": ".init",
    "load_sae": ".io", "save_sae": ".io", "load_sparsity": ".io", "read_cfg": ".io", "from_saelens": ".io",
    "SAEFormatError": ".io", "SAESourceError": ".io",
    "get_sae_class": ".registry", "UnsupportedArchitectureError": ".registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
