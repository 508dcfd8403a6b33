"""Packing invariants on synthetic documents whose token values encode (document, position), so every token can be
traced back: chunk lengths and dtypes, BOS at every chunk start, document order and completeness (only the tail
is lost), one-document-per-sequence never mixing documents."""

from __future__ import annotations

import random

import pytest
import torch

from domain_sae.data.packing import pack
from domain_sae.data.segments import PAD, SPECIAL, TEXT

BOS, PAD_ID = 1, 0


def make_docs(lengths, with_bos=True):
    """Document d: [BOS] + tokens 1000*(d+1) + j (j < length), segments SPECIAL then TEXT."""
    docs = []
    for d, n in enumerate(lengths):
        body = [1000 * (d + 1) + j for j in range(n)]
        ids = ([BOS] if with_bos else []) + body
        segs = ([SPECIAL] if with_bos else []) + [TEXT] * n
        docs.append((ids, segs))
    return docs


def content(tensor_ids):
    """Non-BOS, non-pad tokens of a chunk."""
    return [int(t) for t in tensor_ids if int(t) not in (BOS, PAD_ID)]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ctx", [2, 3, 8, 17])
def test_packed_chunks_start_with_bos_and_lose_only_the_tail(seed, ctx):
    rng = random.Random(seed)
    docs = make_docs([rng.randint(0, 40) for _ in range(rng.randint(1, 12))])
    chunks = list(pack(docs, ctx, bos_id=BOS, pad_id=PAD_ID))
    for ids, segs in chunks:
        assert ids.shape == (ctx,) and segs.shape == (ctx,)
        assert ids.dtype == torch.long and segs.dtype == torch.int8
        assert int(ids[0]) == BOS and int(segs[0]) == SPECIAL
        assert PAD not in segs.tolist()
        assert all((int(i) == BOS) == (int(s) == SPECIAL) for i, s in zip(ids, segs))
    stream = [t for ids, _ in docs for t in ids if t != BOS]
    got = [t for ids, _ in chunks for t in content(ids)]
    assert got == stream[:len(got)]  # order kept, nothing skipped
    # what is left is less than one chunk: a further chunk would need ctx-1 content tokens at most
    assert len(stream) - len(got) < ctx
    # documents start with their own BOS: the token before each document's first token is BOS
    flat = [int(t) for ids, _ in chunks for t in ids]
    for k, t in enumerate(flat):
        if t % 1000 == 0 and t >= 1000:
            assert flat[k - 1] == BOS


def test_packed_chunk_count_matches_independent_count():
    docs = make_docs([5, 9, 3, 12])
    ctx = 6
    # independent simulation: walk the stream; a chunk takes ctx tokens if it starts at a BOS, else ctx-1
    stream = [t for ids, _ in docs for t in ids]
    pos, n = 0, 0
    while pos < len(stream):
        need = ctx if stream[pos] == BOS else ctx - 1
        if pos + need > len(stream):
            break
        pos, n = pos + need, n + 1
    assert len(list(pack(docs, ctx, bos_id=BOS, pad_id=PAD_ID))) == n


def test_no_bos_means_plain_cuts():
    docs = make_docs([7, 7, 7], with_bos=False)
    chunks = list(pack(docs, 5, bos_id=BOS, pad_id=PAD_ID, prepend_bos=False))
    stream = [t for ids, _ in docs for t in ids]
    assert [int(t) for ids, _ in chunks for t in ids] == stream[:20]
    assert len(chunks) == 4


def test_pretokenized_docs_without_bos_still_get_bos_at_chunk_starts():
    docs = make_docs([10, 10], with_bos=False)
    chunks = list(pack(docs, 4, bos_id=BOS, pad_id=PAD_ID))
    assert all(int(ids[0]) == BOS for ids, _ in chunks)
    assert len(chunks) == 6  # 20 tokens in chunks of 3 content tokens


def test_bos_valued_token_mid_document_is_not_doubled():
    docs = [([BOS, 5, 6, BOS, 7, 8, 9], [SPECIAL, TEXT, TEXT, SPECIAL, TEXT, TEXT, TEXT])]
    chunks = [ids.tolist() for ids, _ in pack(docs, 3, bos_id=BOS, pad_id=PAD_ID)]
    assert chunks == [[BOS, 5, 6], [BOS, 7, 8]]


@pytest.mark.parametrize("ctx", [2, 4, 9])
def test_one_document_per_sequence_never_mixes(ctx):
    lengths = [0, 1, 2, 3, 8, 13, 25]
    docs = make_docs(lengths)
    chunks = list(pack(docs, ctx, bos_id=BOS, pad_id=PAD_ID, one_document_per_sequence=True))
    per_doc: dict[int, list[int]] = {}
    for ids, segs in chunks:
        assert ids.shape == (ctx,) and int(ids[0]) == BOS and int(segs[0]) == SPECIAL
        real = segs != PAD
        assert int(real.sum()) >= 2
        # padding only at the end, with pad_id
        n_real = int(real.sum())
        assert bool(real[:n_real].all()) and not bool(real[n_real:].any())
        assert all(int(t) == PAD_ID for t in ids[n_real:])
        owners = {t // 1000 for t in content(ids)}
        assert len(owners) == 1  # a single document
        per_doc.setdefault(owners.pop(), []).extend(content(ids))
    # every document with at least one token comes back whole and in order
    for d, n in enumerate(lengths):
        if n:
            assert per_doc[d + 1] == [1000 * (d + 1) + j for j in range(n)]


def test_length_mismatch_and_bad_context():
    with pytest.raises(ValueError, match="segment codes"):
        list(pack([([1, 2, 3], [0, 1])], 2, bos_id=BOS))
    with pytest.raises(ValueError, match="context_size"):
        list(pack([], 1, bos_id=BOS))
