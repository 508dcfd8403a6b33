"""Architecture name (cfg.json / the ``architecture`` option) -> SAE class.

Every name in :data:`~.model_config.ARCHITECTURES` has a class here; other SAELens architectures are refused by
name with :class:`UnsupportedArchitectureError` (raised by :func:`~.model_config.canonical_architecture`).
"""

from __future__ import annotations

from .base import BaseSAE
from .jumprelu import JumpReLUSAE
from .model_config import (ARCHITECTURES, KNOWN_UNSUPPORTED, UnsupportedArchitectureError,
                           canonical_architecture)
from .standard import StandardSAE
from .topk import BatchTopKSAE, MatryoshkaSAE, TopKSAE

__all__ = ["get_sae_class", "sae_classes", "supported_architectures", "UnsupportedArchitectureError",
           "KNOWN_UNSUPPORTED"]

_CLASSES: dict[str, type[BaseSAE]] = {c.architecture: c for c in (StandardSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE,
                                                                   MatryoshkaSAE)}
assert tuple(sorted(_CLASSES)) == tuple(sorted(ARCHITECTURES)), "registry and ARCHITECTURES disagree"


def sae_classes() -> dict[str, type[BaseSAE]]:
    return dict(_CLASSES)


def supported_architectures() -> list[str]:
    return sorted(_CLASSES)


def get_sae_class(architecture: str, *, where: str = "") -> type[BaseSAE]:
    """The class for ``architecture``; raises :class:`UnsupportedArchitectureError` naming what is supported."""
    return _CLASSES[canonical_architecture(architecture, where=where)]
