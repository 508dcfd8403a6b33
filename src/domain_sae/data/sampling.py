"""Held-out evaluation tokens drawn from many documents across the whole held-out split.

Given the held-out split's documents (deduplicated, see :mod:`.splits`), each with its content digest ``g``:

1. Order. Every document gets a priority ``r(g) = blake2b(b"order" + seed + g)`` (8 bytes, big-endian); the
   documents are taken in increasing ``r``: a uniformly random order of the whole split that depends only on the
   documents' content and ``seed`` (not on file order, streaming or ``max_rows`` beyond which documents exist).
   Only the ``K = N * ctx`` smallest priorities are kept while streaming (a bounded heap; each document gives at
   least one token, so K is always enough). With ``max_documents`` M, only the first M held-out documents of the
   source are read (a bound for large streamed datasets; the sample then depends on which documents come first).
2. Span. A document of L tokens (after tokenization, with its BOS) gives all of them when ``L <= cap``
   (``cap = max_tokens_per_document``; None = no cap), else the span ``[o, o + cap)`` with offset
   ``o = blake2b(b"offset" + seed + g) mod (L - cap + 1)``. A span that starts inside the document (o > 0) is
   preceded by a BOS (``SPECIAL``, document id -1) when ``prepend_bos``, so the model sees a document start.
3. Windows. The spans are concatenated in priority order and cut into ``N = ceil(n_tokens / ctx)`` windows of
   ``ctx = context_size`` tokens by the packing rule of :mod:`.packing` (a window that would start with a token
   other than BOS gets a BOS inserted at position 0, document id -1); with ``one_document_per_sequence`` each span
   is chunked alone and its last chunk padded (``PAD``, document id -1). Documents are added until N windows are
   full; the tokens left over in the last partial window are dropped.

``doc_ids[n, t]`` is the index into ``documents`` (hex digests, in order of first appearance) of the document of
token t of window n, or -1 for inserted BOS / padding. ``n_documents`` = number of distinct documents with at least
one token in the windows: the clusters of the evaluation's standard errors (``evaluation.uncertainty``).
"""

from __future__ import annotations

import hashlib
import heapq
import math
import struct
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch

from .formatting import tokenize_documents
from .segments import PAD, SEGMENT_DTYPE, SPECIAL
from .sources import DataError, Document

__all__ = ["HeldoutSample", "sample_windows", "document_priority", "span_offset"]

_TOKENIZE_BATCH = 16


@dataclass
class HeldoutSample:
    """Evaluation tokens: ``input_ids`` [N, ctx] int64, ``segments`` [N, ctx] int8, ``doc_ids`` [N, ctx] int64
    (index into ``documents``, -1 for inserted BOS/padding), ``documents`` (hex digests of the sampled documents),
    ``n_documents`` (distinct documents in the windows), ``heldout_documents`` (documents in the held-out split after
    deduplication), ``duplicates_removed`` (duplicate documents dropped while reading the source, both splits),
    ``max_tokens_per_document`` and ``seed``. Unpacks as ``input_ids, segments`` (the older tuple interface)."""

    input_ids: torch.Tensor
    segments: torch.Tensor
    doc_ids: torch.Tensor
    documents: list[str]
    n_documents: int
    heldout_documents: int
    duplicates_removed: int
    max_tokens_per_document: Optional[int]
    seed: int

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.input_ids, self.segments))

    def __getitem__(self, i: int) -> torch.Tensor:
        return (self.input_ids, self.segments)[i]

    def __len__(self) -> int:
        return 2

    def summary(self) -> dict:
        """The sampling facts a report states (JSON-ready)."""
        return {"sequences": int(self.input_ids.shape[0]), "context_size": int(self.input_ids.shape[1]),
                "documents": self.n_documents, "heldout_documents": self.heldout_documents,
                "duplicates_removed": self.duplicates_removed,
                "max_tokens_per_document": self.max_tokens_per_document, "seed": self.seed}


def _hash8(tag: bytes, seed: int, digest: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(tag + struct.pack("<q", int(seed)) + digest, digest_size=8).digest(), "big")


def document_priority(digest: bytes, seed: int) -> int:
    """r(g): the document's place in the sampling order (smaller first)."""
    return _hash8(b"order", seed, digest)


def span_offset(digest: bytes, seed: int, length: int, cap: Optional[int]) -> int:
    """o: where the document's span of ``cap`` tokens starts (0 when the document fits)."""
    if cap is None or length <= cap:
        return 0
    return _hash8(b"offset", seed, digest) % (length - cap + 1)


def _smallest(keyed_docs: Iterable[tuple[bytes, Document]], seed: int, k: int,
              max_documents: Optional[int]) -> tuple[list, int]:
    """The k documents of smallest priority, sorted, and the number of documents seen (at most max_documents)."""
    heap: list = []  # max-heap on priority via negation
    n = 0
    for digest, doc in keyed_docs:
        if max_documents is not None and n >= max_documents:
            break
        n += 1
        item = (-document_priority(digest, seed), digest, doc)
        if len(heap) < k:
            heapq.heappush(heap, item)
        elif item[0] > heap[0][0]:
            heapq.heapreplace(heap, item)
    return [(d, doc) for _, d, doc in sorted(heap, key=lambda t: (-t[0], t[1]))], n


class _Packer:
    """Cuts a stream of (id, segment, doc) tokens into windows by the rule of the module docstring."""

    def __init__(self, ctx: int, bos_id: Optional[int], pad_id: int, prepend_bos: bool, per_document: bool):
        self.ctx, self.bos, self.pad, self.prepend = ctx, bos_id, pad_id, prepend_bos
        self.per_document = per_document
        self.windows: list[tuple[list[int], list[int], list[int]]] = []
        self.buf: tuple[list[int], list[int], list[int]] = ([], [], [])

    def _cut(self, final: bool) -> None:
        ids, segs, docs = self.buf
        pos = 0
        while pos < len(ids):
            head = self.prepend and ids[pos] != self.bos
            need = self.ctx - 1 if head else self.ctx
            if pos + need > len(ids):
                if final and len(ids) - pos + int(head) >= 2:  # one document per sequence: pad the last chunk
                    w = ([self.bos] * head + ids[pos:], [SPECIAL] * head + segs[pos:], [-1] * head + docs[pos:])
                    fill = self.ctx - len(w[0])
                    self.windows.append((w[0] + [self.pad] * fill, w[1] + [PAD] * fill, w[2] + [-1] * fill))
                    pos = len(ids)
                break
            self.windows.append(([self.bos] * head + ids[pos:pos + need], [SPECIAL] * head + segs[pos:pos + need],
                                 [-1] * head + docs[pos:pos + need]))
            pos += need
        self.buf = (ids[pos:], segs[pos:], docs[pos:])

    def add(self, ids: list[int], segs: list[int], docs: list[int]) -> None:
        for part, new in zip(self.buf, (ids, segs, docs)):
            part.extend(new)
        self._cut(final=self.per_document)
        if self.per_document:
            self.buf = ([], [], [])


def _span(ids: list[int], segs: list[int], digest: bytes, seed: int, cap: Optional[int], bos_id: Optional[int],
          prepend_bos: bool) -> tuple[list[int], list[int], bool]:
    """The document's tokens to sample (step 2 of the module docstring) and whether a BOS must precede them."""
    o = span_offset(digest, seed, len(ids), cap)
    end = len(ids) if cap is None else o + cap
    return ids[o:end], segs[o:end], prepend_bos and o > 0 and ids[o] != bos_id


def sample_windows(keyed_docs: Iterable[tuple[bytes, Document]], tokenizer, *, n_tokens: int, context_size: int,
                   bos_id: Optional[int], pad_id: int, prepend_bos: bool, one_document_per_sequence: bool,
                   max_tokens_per_document: Optional[int], seed: int, duplicates_removed=lambda: 0,
                   description: str = "held-out split", max_documents: Optional[int] = None) -> HeldoutSample:
    """The :class:`HeldoutSample` of ``ceil(n_tokens / context_size)`` windows from ``keyed_docs`` (``(digest,
    document)`` of the held-out split, e.g. ``TokenStream.keyed_documents()``), by the module docstring's steps.
    ``duplicates_removed`` is called after the documents are read (the count the reader kept); ``heldout_documents``
    of the result counts the held-out documents read (all of them unless ``max_documents`` stopped the reading)."""
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive (got {n_tokens}).")
    cap = max_tokens_per_document
    if cap is not None and cap < 1:
        raise DataError(f"heldout_tokens_per_document must be at least 1 or null (got {cap}).")
    ctx = int(context_size)
    n_windows = max(1, math.ceil(n_tokens / ctx))
    chosen, n_heldout = _smallest(keyed_docs, seed, n_windows * ctx, max_documents)
    packer = _Packer(ctx, bos_id, pad_id, prepend_bos, one_document_per_sequence)
    for start in range(0, len(chosen), _TOKENIZE_BATCH):
        if len(packer.windows) >= n_windows:
            break
        part = chosen[start:start + _TOKENIZE_BATCH]
        for j, (ids, segs) in enumerate(tokenize_documents([doc for _, doc in part], tokenizer, prepend_bos)):
            if len(packer.windows) >= n_windows:
                break
            s_ids, s_segs, head = _span(list(ids), list(segs), part[j][0], seed, cap, bos_id, prepend_bos)
            packer.add([bos_id] * head + s_ids, [SPECIAL] * head + s_segs, [-1] * head + [start + j] * len(s_ids))
    windows = packer.windows[:n_windows]
    if not windows:
        raise DataError(f"The {description} gives no sequence of {ctx} tokens ({n_heldout} held-out documents); "
                        f"raise holdout_fraction or max_rows, or lower context_size.")
    if len(windows) < n_windows:
        warnings.warn(f"The {description} holds only {len(windows) * ctx} tokens (at most {cap} per document from "
                      f"{n_heldout} documents), fewer than the {n_tokens} asked for; evaluating on those. Raise "
                      f"holdout_fraction or heldout_tokens_per_document for more.", stacklevel=3)
    raw_docs = torch.tensor([w[2] for w in windows], dtype=torch.long)
    present = sorted(set(raw_docs[raw_docs >= 0].tolist()))  # priority order = order of first appearance
    remap = torch.full((len(chosen) + 1,), -1, dtype=torch.long)
    remap[torch.tensor(present, dtype=torch.long)] = torch.arange(len(present))
    doc_ids = torch.where(raw_docs >= 0, remap[raw_docs.clamp(min=0)], raw_docs)
    return HeldoutSample(input_ids=torch.tensor([w[0] for w in windows], dtype=torch.long),
                         segments=torch.tensor([w[1] for w in windows], dtype=SEGMENT_DTYPE), doc_ids=doc_ids,
                         documents=[chosen[i][0].hex() for i in present], n_documents=len(present),
                         heldout_documents=n_heldout, duplicates_removed=int(duplicates_removed()),
                         max_tokens_per_document=cap, seed=int(seed))
