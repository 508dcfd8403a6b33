"""Tokenized documents -> fixed-length sequences of ``context_size`` tokens (ids int64, segments int8).

Packed mode (default, ``one_document_per_sequence=False``)
    The documents' tokens are concatenated into one stream in order (with ``prepend_bos`` every document already
    starts with BOS, which is what separates documents) and cut into consecutive chunks:

    * ``prepend_bos=False``: each chunk is the next ``context_size`` stream tokens.
    * ``prepend_bos=True``: every chunk starts with BOS. If the next stream token is ``bos_id`` (a document start,
      or a BOS-valued token inside a document such as SmolLM2's ``<|im_start|>``), the chunk is the next
      ``context_size`` stream tokens. Otherwise the chunk would start mid-document: a BOS is inserted at position 0
      (segment ``SPECIAL``) followed by the next ``context_size - 1`` stream tokens.

    A chunk may hold the end of one document and the start of the next. When the stream ends, the trailing tokens
    that do not fill a whole chunk are dropped (nothing else is lost).

One document per sequence (``one_document_per_sequence=True``)
    Each document is chunked on its own by the same rule (so every chunk starts with BOS when ``prepend_bos``), the
    last chunk of a document is filled up with ``pad_id`` (segment ``PAD``), and chunks with fewer than 2 non-pad
    tokens (nothing to predict) are dropped. A sequence never holds tokens of two documents.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional, Sequence

import torch

from .segments import PAD, SEGMENT_DTYPE, SPECIAL

__all__ = ["pack"]


def _chunk(ids: list[int], segs: list[int], start: int, ctx: int, bos_id: Optional[int], prepend_bos: bool):
    """(chunk_ids, chunk_segs, new_start): the chunk starting at stream position ``start``; None when the stream
    from ``start`` is too short for a full chunk."""
    if prepend_bos and ids[start] != bos_id:
        end = start + ctx - 1
        if end > len(ids):
            return None
        return [bos_id] + ids[start:end], [SPECIAL] + segs[start:end], end
    end = start + ctx
    if end > len(ids):
        return None
    return ids[start:end], segs[start:end], end


def _tensors(ids: list[int], segs: list[int]):
    return torch.tensor(ids, dtype=torch.long), torch.tensor(segs, dtype=SEGMENT_DTYPE)


def pack(docs_tokens: Iterable[tuple[Sequence[int], Sequence[int]]], context_size: int, *, bos_id: Optional[int],
         pad_id: Optional[int] = None, prepend_bos: bool = True, one_document_per_sequence: bool = False
         ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(ids LongTensor[context_size], segments Int8Tensor[context_size])`` by the policy of the module
    docstring. ``pad_id`` (default ``bos_id``, then 0) fills padded positions; they are marked ``PAD`` anyway."""
    ctx = int(context_size)
    if ctx < 2:
        raise ValueError(f"context_size must be >= 2 (got {context_size}).")
    if prepend_bos and bos_id is None:
        raise ValueError("prepend_bos needs a bos_id (the tokenizer's BOS, or EOS when it has none).")
    if one_document_per_sequence:
        yield from _pack_per_document(docs_tokens, ctx, bos_id, pad_id, prepend_bos)
        return
    buf_ids: list[int] = []
    buf_segs: list[int] = []
    pos = 0
    for ids, segs in docs_tokens:
        if len(ids) != len(segs):
            raise ValueError(f"A document has {len(ids)} ids but {len(segs)} segment codes.")
        buf_ids.extend(ids)
        buf_segs.extend(segs)
        while pos < len(buf_ids):
            got = _chunk(buf_ids, buf_segs, pos, ctx, bos_id, prepend_bos)
            if got is None:
                break
            c_ids, c_segs, pos = got
            yield _tensors(c_ids, c_segs)
        if pos > 4 * ctx:  # drop consumed tokens now and then (keeps the buffer small without O(n^2) copying)
            del buf_ids[:pos], buf_segs[:pos]
            pos = 0
    # the remaining buf_ids[pos:] (shorter than one chunk) is the dropped tail


def _pack_per_document(docs_tokens, ctx: int, bos_id, pad_id, prepend_bos: bool):
    fill = pad_id if pad_id is not None else (bos_id if bos_id is not None else 0)
    for ids, segs in docs_tokens:
        ids, segs = list(ids), list(segs)
        if len(ids) != len(segs):
            raise ValueError(f"A document has {len(ids)} ids but {len(segs)} segment codes.")
        pos = 0
        while pos < len(ids):
            got = _chunk(ids, segs, pos, ctx, bos_id, prepend_bos)
            if got is None:  # the document's last, short chunk: pad it
                head_ids, head_segs = ([bos_id], [SPECIAL]) if prepend_bos and ids[pos] != bos_id else ([], [])
                c_ids, c_segs = head_ids + ids[pos:], head_segs + segs[pos:]
                pos = len(ids)
                if len(c_ids) < 2:
                    break
                n_pad = ctx - len(c_ids)
                c_ids, c_segs = c_ids + [fill] * n_pad, c_segs + [PAD] * n_pad
            else:
                c_ids, c_segs, pos = got
            yield _tensors(c_ids, c_segs)
