"""Sparse autoencoders: the SAE contract (base), the architectures (standard, topk, batchtopk, jumprelu,
matryoshka), sparse kernels, initialisation and SAELens-compatible save/load.

Imports are lazy so that ``import domain_sae.sae`` stays cheap and never pulls optional packages.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "SAE": ".base", "BaseSAE": ".base", "LossOutput": ".base", "check_compatible": ".base",
    "SAEModelConfig": ".model_config", "SAECompatibilityError": ".model_config",
    "UnsupportedArchitectureError": ".model_config", "ARCHITECTURES": ".model_config",
    "StandardSAE": ".standard", "TopKSAE": ".topk", "BatchTopKSAE": ".topk", "MatryoshkaSAE": ".topk",
    "JumpReLUSAE": ".jumprelu", "SparseLatents": ".sparse",
    "initialize": ".init", "geometric_median": ".init",
    "load_sae": ".io", "from_saelens": ".io", "SAESourceError": ".io",
    "save_sae": ".format", "load_sparsity": ".format", "read_cfg": ".format", "SAEFormatError": ".format",
    "get_sae_class": ".registry", "supported_architectures": ".registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
