"""Deterministic held-out split and duplicate removal, both by a hash of each document's normalised content.

    norm(s)  = " ".join(s.split())        (runs of whitespace -> one space, no leading/trailing whitespace)
    key(doc) = b"text\\0" + UTF-8 of norm(text)                                      (text documents)
             | b"chat\\0" + UTF-8 of json.dumps([{**m, "content": norm(m["content"])} for m in messages],
                                               sort_keys=True, ensure_ascii=False, separators=(",", ":"))
             | b"ids\\0"  + the ids as little-endian int64 bytes                     (pre-tokenized documents)
    digest(doc) = blake2b(key(doc), digest_size=16)
    u(doc)   = int.from_bytes(digest[:8], "big") / 2**64   in [0, 1)
    held out  <=>  u(doc) < fraction

Membership depends only on the document's normalised content, never on its position, on ``max_rows`` or on
streaming, so the same document is held out in every run. Exact duplicates and documents that differ only in
whitespace have the same key, hence the same side of the split: training never sees a copy of a held-out document.
:class:`Deduplicator` then keeps only the first document of each key (``data.pipeline`` applies it before the
split filter, so both splits are duplicate-free and the count removed is reported).
"""

from __future__ import annotations

import hashlib
import json
import struct

from .sources import Document

__all__ = ["SPLIT_VERSION", "normalise_whitespace", "document_key", "document_digest", "heldout_score", "is_heldout",
           "score_of_digest", "Deduplicator"]

#: Recorded in SAE metadata (``heldout_split``): which hash defines the held-out split. SAEs trained before it
#: (no ``heldout_split`` key) were split on the raw, un-normalised content.
SPLIT_VERSION = "blake2b-normalised-whitespace/2"


def normalise_whitespace(s: str) -> str:
    """``" ".join(s.split())``: every run of whitespace becomes one space; leading/trailing whitespace removed."""
    return " ".join(s.split())


def _normalise_message(m: dict) -> dict:
    content = m.get("content")
    return {**m, "content": normalise_whitespace(content)} if isinstance(content, str) else dict(m)


def document_key(doc: Document) -> bytes:
    """The bytes hashed for ``doc`` (see the module docstring)."""
    if doc.text is not None:
        return b"text\0" + normalise_whitespace(doc.text).encode("utf-8")
    if doc.messages is not None:
        canon = json.dumps([_normalise_message(m) for m in doc.messages], sort_keys=True, ensure_ascii=False,
                           separators=(",", ":"))
        return b"chat\0" + canon.encode("utf-8")
    ids = doc.input_ids or []
    return b"ids\0" + struct.pack(f"<{len(ids)}q", *ids)


def document_digest(doc: Document) -> bytes:
    """blake2b(key(doc), digest_size=16): the document's identity for the split, deduplication and document ids."""
    return hashlib.blake2b(document_key(doc), digest_size=16).digest()


def score_of_digest(digest: bytes) -> float:
    """u in [0, 1): the first 8 bytes of the digest read as a big-endian integer, divided by 2**64."""
    return int.from_bytes(digest[:8], "big") / 2.0**64


def heldout_score(doc: Document) -> float:
    """u(doc) in [0, 1) (module docstring)."""
    return score_of_digest(document_digest(doc))


def is_heldout(doc: Document, fraction: float) -> bool:
    """True when ``doc`` belongs to the held-out split: ``heldout_score(doc) < fraction``."""
    if fraction <= 0.0:
        return False
    return heldout_score(doc) < fraction


class Deduplicator:
    """Keeps the first document of each normalised key: ``keep(digest) -> bool``; ``removed`` counts the rest.

    Memory: one 16-byte digest per distinct document seen (bound it with ``max_rows`` for very large streams).
    """

    def __init__(self):
        self._seen: set[bytes] = set()
        self.removed = 0

    def keep(self, digest: bytes) -> bool:
        if digest in self._seen:
            self.removed += 1
            return False
        self._seen.add(digest)
        return True
