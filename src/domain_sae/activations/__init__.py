"""Activations for SAE training: a shuffled buffer fed by the live model (:class:`ActivationStore`), by an
on-disk cache (:class:`CachedActivationSource`; built by :func:`.hook_cache.build_cache`) or by a mixture of sources
(:class:`MixtureSource`), all implementing :class:`ActivationSource` (one iterator and exact-resume state
interface)."""

from .cache import CachedActivationSource, CacheError, read_manifest
from .mixture import MixtureSource, split_evenly
from .source import ActivationSource
from .live import (ActivationSourceError, ActivationStore, ShuffleBufferSource, SourceExhaustedError,
                    StoreStateError, refill_seed, training_mask)

__all__ = [
    "ActivationStore", "CachedActivationSource", "read_manifest", "ShuffleBufferSource",
    "ActivationSourceError", "SourceExhaustedError", "StoreStateError", "CacheError", "refill_seed",
    "training_mask", "MixtureSource", "split_evenly", "ActivationSource",
]
