"""Deterministic held-out split by a hash of each document's content.

    key(doc) = b"text\\0" + UTF-8 of the text                                        (text documents)
             | b"chat\\0" + UTF-8 of json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
             | b"ids\\0"  + the ids as little-endian int64 bytes                     (pre-tokenized documents)
    u(doc)   = int.from_bytes(blake2b(key, digest_size=8), "big") / 2**64   in [0, 1)
    held out  <=>  u(doc) < fraction

Membership depends only on the document itself, never on its position, on ``max_rows`` or on streaming, so the
same document is held out in every run, and identical documents always land on the same side.
"""

from __future__ import annotations

import hashlib
import json
import struct

from .sources import Document

__all__ = ["document_key", "heldout_score", "is_heldout"]


def document_key(doc: Document) -> bytes:
    """The bytes hashed for ``doc`` (see the module docstring)."""
    if doc.text is not None:
        return b"text\0" + doc.text.encode("utf-8")
    if doc.messages is not None:
        canon = json.dumps(doc.messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return b"chat\0" + canon.encode("utf-8")
    ids = doc.input_ids or []
    return b"ids\0" + struct.pack(f"<{len(ids)}q", *ids)


def heldout_score(doc: Document) -> float:
    """u(doc) in [0, 1): the first 8 bytes of blake2b(key) read as a big-endian integer, divided by 2**64."""
    digest = hashlib.blake2b(document_key(doc), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def is_heldout(doc: Document, fraction: float) -> bool:
    """True when ``doc`` belongs to the held-out split: ``heldout_score(doc) < fraction``."""
    if fraction <= 0.0:
        return False
    return heldout_score(doc) < fraction
