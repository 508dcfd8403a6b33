"""The held-out sampler and duplicate removal, checked against brute force on synthetic jsonl data with the real
SmolLM2 tokenizer: coverage (many documents, each a contiguous span of at most the cap), the document order
recomputed with hashlib, determinism and independence from file order, seeds; exact and whitespace duplicates
removed (counted) and always on the same side of the split as their original."""

from __future__ import annotations

import hashlib
import math
import struct

import pytest
import torch

from data_helpers import make_texts, write_jsonl

from domain_sae.config import DataConfig
from domain_sae.data.formatting import tokenize_document
from domain_sae.data.token_stream import TokenStream, heldout_batch
from domain_sae.data.sampling import HeldoutSample
from domain_sae.data.segments import PAD, SPECIAL
from domain_sae.data.sources import Document
from domain_sae.data.splits import document_digest, is_heldout



def cfg_for(spec, **kw):
    base = dict(data=spec, context_size=16, holdout_fraction=0.5, heldout_tokens_per_document=6)
    base.update(kw)
    return DataConfig(**base)


def _priority(text: str, seed: int) -> int:
    """Independent recomputation of the sampling order: blake2b(b"order" + seed + blake2b16(normalised key))."""
    key = b"text\0" + " ".join(text.split()).encode()
    digest = hashlib.blake2b(key, digest_size=16).digest()
    return int.from_bytes(hashlib.blake2b(b"order" + struct.pack("<q", seed) + digest, digest_size=8).digest(),
                          "big")


def _contains(seq: list[int], part: list[int]) -> bool:
    return any(seq[i:i + len(part)] == part for i in range(len(seq) - len(part) + 1))


@pytest.fixture
def corpus(tmp_path):
    texts = make_texts(200)
    return texts, write_jsonl(tmp_path / "corpus.jsonl", texts)


def test_sample_covers_many_documents_with_capped_contiguous_spans(corpus, smol_tokenizer):
    texts, spec = corpus
    cfg = cfg_for(spec)
    sample = heldout_batch(cfg, smol_tokenizer, 16 * 8)
    assert isinstance(sample, HeldoutSample) and sample.input_ids.shape == (8, 16)
    ids, segs = sample  # the tuple interface still works
    assert torch.equal(ids, sample.input_ids) and torch.equal(segs, sample.segments)
    held = [t for t in texts if is_heldout(Document(text=t), 0.5)]
    assert sample.heldout_documents == len(held) and sample.duplicates_removed == 0
    # the documents, in order, are the held-out documents of smallest priority (recomputed with hashlib)
    order = sorted(held, key=lambda t: _priority(t, 0))
    assert sample.documents == [document_digest(Document(text=t)).hex() for t in order[:sample.n_documents]]
    assert sample.n_documents == len(set(sample.doc_ids[sample.doc_ids >= 0].tolist()))
    # every token is attributed: -1 only on inserted BOS (special); each document gives a contiguous span of its
    # own tokens, of min(length, cap) tokens (the last document may be cut by the end of the sample)
    assert bool((segs[sample.doc_ids < 0] == SPECIAL).all())
    for d in range(sample.n_documents):
        got = ids[sample.doc_ids == d].tolist()
        full, _ = tokenize_document(Document(text=order[d]), smol_tokenizer)
        assert len(got) <= 6 and _contains(full, got), d
        if d < sample.n_documents - 1:
            assert len(got) == min(len(full), 6)
    # coverage: at most 6 tokens per document -> at least ceil(attributed tokens / 6) documents
    assert sample.n_documents >= math.ceil(int((sample.doc_ids >= 0).sum()) / 6) >= 16


def test_sample_is_deterministic_order_independent_and_seeded(tmp_path, corpus, smol_tokenizer):
    texts, spec = corpus
    a = heldout_batch(cfg_for(spec), smol_tokenizer, 100)
    b = heldout_batch(cfg_for(spec), smol_tokenizer, 100)
    rev = heldout_batch(cfg_for(write_jsonl(tmp_path / "rev.jsonl", texts[::-1])), smol_tokenizer, 100)
    for other in (b, rev):
        assert torch.equal(a.input_ids, other.input_ids) and torch.equal(a.doc_ids, other.doc_ids)
        assert a.documents == other.documents
    seeded = heldout_batch(cfg_for(spec, heldout_seed=1), smol_tokenizer, 100)
    assert seeded.documents != a.documents
    # a smaller sample is a prefix of the larger one's documents (same order)
    small = heldout_batch(cfg_for(spec), smol_tokenizer, 32)
    assert a.documents[:small.n_documents - 1] == small.documents[:-1]


def test_uncapped_and_one_document_per_sequence(corpus, smol_tokenizer):
    _, spec = corpus
    whole = heldout_batch(cfg_for(spec, heldout_tokens_per_document=None), smol_tokenizer, 64)
    capped = heldout_batch(cfg_for(spec), smol_tokenizer, 64)
    assert whole.n_documents < capped.n_documents
    per_doc = heldout_batch(cfg_for(spec, one_document_per_sequence=True), smol_tokenizer, 64)
    for row_docs, row_segs in zip(per_doc.doc_ids, per_doc.segments):
        assert len(set(row_docs[row_docs >= 0].tolist())) == 1  # one document per window, padded
        assert bool((row_segs[row_docs < 0] != PAD).sum() <= 1)


def test_short_split_warns_with_the_cap(corpus, smol_tokenizer):
    _, spec = corpus
    with pytest.warns(UserWarning, match="at most 6 per document"):
        s = heldout_batch(cfg_for(spec, max_rows=20), smol_tokenizer, 10_000)
    assert 0 < s.input_ids.shape[0] < 10_000 // 16


def test_duplicates_removed_before_the_split_and_on_the_same_side(tmp_path, smol_tokenizer):
    texts = make_texts(60)
    dups = [texts[3], texts[3], "  " + texts[5].replace(" ", " \n\t ") + "\n", texts[7] + "   "]
    spec = write_jsonl(tmp_path / "dups.jsonl", texts + dups)
    cfg = cfg_for(spec)
    train = TokenStream(cfg, smol_tokenizer, split="train")
    held = TokenStream(cfg, smol_tokenizer, split="heldout")
    train_docs = [d.text for d in train.documents()]
    held_docs = [d.text for d in held.documents()]
    assert train.duplicates_removed == held.duplicates_removed == len(dups)
    assert sorted(train_docs + held_docs) == sorted(texts)  # the first copy of each is kept
    norm = {" ".join(t.split()) for t in held_docs}
    for d in dups:  # a duplicate falls on the side of its original: training never sees a held-out document
        assert is_heldout(Document(text=d), 0.5) == (" ".join(d.split()) in norm)
    assert heldout_batch(cfg, smol_tokenizer, 32).duplicates_removed == len(dups)
    kept = TokenStream(cfg_for(spec, deduplicate=False), smol_tokenizer, split="train")
    assert len(list(kept.documents())) + len(list(TokenStream(cfg_for(spec, deduplicate=False), smol_tokenizer,
                                                              split="heldout").documents())) == len(texts + dups)


def test_max_documents_bounds_the_reading(corpus, smol_tokenizer):
    texts, spec = corpus
    s = heldout_batch(cfg_for(spec, heldout_max_documents=10), smol_tokenizer, 64)
    first10 = [t for t in texts if is_heldout(Document(text=t), 0.5)][:10]
    assert s.heldout_documents == 10
    assert set(s.documents) <= {document_digest(Document(text=t)).hex() for t in first10}
