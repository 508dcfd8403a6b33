"""Tokens for SAEs: dataset sources, chat/text formatting with per-token segment labels, packing to fixed-length
sequences and a deterministic held-out split.

Modules: ``segments`` (codes, training mask), ``sources`` (documents from built-in chat/code, files, directories,
the hub), ``formatting`` (tokenization + labels), ``packing`` (sequences), ``splits`` (held-out hash),
``token_stream`` (TokenStream, heldout_batch). Names are imported lazily so that ``import domain_sae.data.sources``
(e.g. for :class:`DataError`) does not load torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "segments": ["PAD", "SPECIAL", "TEXT", "USER", "ASSISTANT", "TEMPLATE", "SYSTEM", "SEGMENT_NAMES",
                 "segment_name", "training_mask"],
    "sources": ["DataError", "Document", "DocumentSource", "open_source"],
    "formatting": ["tokenize_document", "tokenize_documents", "bos_token_id"],
    "packing": ["pack"],
    "splits": ["is_heldout"],
    "token_stream": ["TokenStream", "heldout_batch", "check_context_size"],
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
