"""Held-out split and the token pipeline on synthetic jsonl data with the real SmolLM2 tokenizer: the split is
disjoint, stable under reordering and max_rows; TokenStream skip/repeat/epochs; heldout_batch determinism and
errors; context-size check; the built-in corpora end to end (first sequences only)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from itertools import islice

import pytest
import torch

from data_helpers import make_texts, write_jsonl

from domain_sae.config import DataConfig
from domain_sae.data.formatting import tokenize_document
from domain_sae.data.packing import pack
from domain_sae.data.segments import ASSISTANT, SPECIAL, TEXT, USER
from domain_sae.data.sources import DataError, Document, open_source
from domain_sae.data.sampling import document_priority
from domain_sae.data.splits import document_digest, heldout_score, is_heldout
from domain_sae.data.token_stream import TokenStream, check_context_size, heldout_batch



@pytest.fixture
def corpus(tmp_path):
    texts = make_texts(120)
    return texts, write_jsonl(tmp_path / "corpus.jsonl", texts)


def cfg_for(spec, **kw):
    base = dict(data=spec, context_size=16, holdout_fraction=0.25)
    base.update(kw)
    return DataConfig(**base)


# ---------------------------------------------------------------------------------------------------------------
# splits

def test_heldout_score_is_blake2b_of_the_content():
    doc = Document(text="  hello \n\t world ")
    digest = hashlib.blake2b(b"text\0hello world", digest_size=16).digest()
    assert heldout_score(doc) == int.from_bytes(digest[:8], "big") / 2**64
    chat = Document(messages=[{"role": "user", "content": "h\u00e9  there"}])
    canon = json.dumps([{"role": "user", "content": "h\u00e9 there"}], sort_keys=True, ensure_ascii=False,
                       separators=(",", ":")).encode()
    assert heldout_score(chat) == int.from_bytes(hashlib.blake2b(b"chat\0" + canon, digest_size=16).digest()[:8],
                                                 "big") / 2**64
    assert not is_heldout(doc, 0.0) and is_heldout(doc, 1.0)


def test_heldout_fraction_is_roughly_respected():
    docs = [Document(text=t) for t in make_texts(2000)]
    frac = sum(is_heldout(d, 0.1) for d in docs) / len(docs)
    assert 0.07 < frac < 0.13


def test_split_disjoint_and_stable_under_reordering_and_max_rows(tmp_path, corpus, smol_tokenizer):
    texts, spec = corpus
    cfg = cfg_for(spec)
    train = [d.text for d in TokenStream(cfg, smol_tokenizer, split="train").documents()]
    held = [d.text for d in TokenStream(cfg, smol_tokenizer, split="heldout").documents()]
    assert set(train).isdisjoint(held) and sorted(train + held) == sorted(texts) and held
    # reversed file: same membership
    rev_spec = write_jsonl(tmp_path / "rev.jsonl", texts[::-1])
    held_rev = [d.text for d in TokenStream(cfg_for(rev_spec), smol_tokenizer, split="heldout").documents()]
    assert sorted(held_rev) == sorted(held)
    # max_rows is applied before the split: held-out docs are those of the first max_rows rows
    held_50 = [d.text for d in TokenStream(cfg_for(spec, max_rows=50), smol_tokenizer, split="heldout").documents()]
    assert held_50 == [t for t in held if texts.index(t) < 50]


# ---------------------------------------------------------------------------------------------------------------
# TokenStream

def test_stream_equals_independent_pipeline(corpus, smol_tokenizer):
    texts, spec = corpus
    cfg = cfg_for(spec)
    got = list(TokenStream(cfg, smol_tokenizer, split="train"))
    docs = [Document(text=t) for t in texts if not is_heldout(Document(text=t), 0.25)]
    expected = list(pack((tokenize_document(d, smol_tokenizer) for d in docs), 16,
                         bos_id=smol_tokenizer.bos_token_id, pad_id=smol_tokenizer.pad_token_id))
    assert len(got) == len(expected) > 10
    for (a, sa), (b, sb) in zip(got, expected):
        assert torch.equal(a, b) and torch.equal(sa, sb)
        assert a.dtype == torch.long and sa.dtype == torch.int8 and a.shape == (16,)


def test_skip_resumes_at_the_same_sequence(corpus, smol_tokenizer):
    _, spec = corpus
    cfg = cfg_for(spec)
    full = list(TokenStream(cfg, smol_tokenizer))
    s = TokenStream(cfg, smol_tokenizer)
    s.skip(3)
    s.skip(2)
    rest = list(s)
    assert len(rest) == len(full) - 5
    assert all(torch.equal(a[0], b[0]) for a, b in zip(rest, full[5:]))


def test_repeat_starts_over_with_a_warning_per_epoch(corpus, smol_tokenizer):
    _, spec = corpus
    cfg = cfg_for(spec, max_rows=20)
    one = list(TokenStream(cfg, smol_tokenizer))
    n = len(one)
    stream = TokenStream(cfg, smol_tokenizer, repeat=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seqs = list(islice(iter(stream), 2 * n + 1))
    epoch_warnings = [w for w in caught if "exhausted" in str(w.message)]
    assert len(epoch_warnings) == 2 and f"{n * 16} tokens" in str(epoch_warnings[0].message)
    assert stream.epochs == 2
    assert all(torch.equal(seqs[i][0], seqs[i + n][0]) for i in range(n))
    # a skip longer than an epoch lands in the next epoch
    s2 = TokenStream(cfg, smol_tokenizer, repeat=True)
    s2.skip(n + 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(next(iter(s2))[0], one[2][0])


def test_empty_split_raises(tmp_path, smol_tokenizer):
    spec = write_jsonl(tmp_path / "tiny.jsonl", ["a b", "c d"])  # far fewer tokens than one sequence
    with pytest.raises(DataError, match="no sequence of 64 tokens"):
        next(iter(TokenStream(cfg_for(spec, context_size=64), smol_tokenizer, repeat=True)))
    with pytest.raises(DataError, match="holdout_fraction"):
        TokenStream(cfg_for(spec, holdout_fraction=0.0), smol_tokenizer, split="heldout")


def test_one_document_per_sequence_pipeline(corpus, smol_tokenizer):
    _, spec = corpus
    seqs = list(islice(iter(TokenStream(cfg_for(spec, one_document_per_sequence=True, context_size=32),
                                        smol_tokenizer)), 10))
    for ids, segs in seqs:
        assert int(ids[0]) == smol_tokenizer.bos_token_id
        text = smol_tokenizer.decode(ids[segs == TEXT])
        assert text.count("Document ") == 1  # one document per sequence


# ---------------------------------------------------------------------------------------------------------------
# heldout_batch, context size

def test_heldout_batch_deterministic_and_from_heldout_docs(corpus, smol_tokenizer):
    texts, spec = corpus
    cfg = cfg_for(spec)
    ids, segs = heldout_batch(cfg, smol_tokenizer, 40)
    assert ids.shape == (3, 16) and segs.shape == (3, 16) and segs.dtype == torch.int8
    ids2, segs2 = heldout_batch(cfg, smol_tokenizer, 40)
    assert torch.equal(ids, ids2) and torch.equal(segs, segs2)
    held_text = "".join(t for t in texts if is_heldout(Document(text=t), 0.25))
    decoded = smol_tokenizer.decode(ids[0][segs[0] == TEXT])
    assert decoded.split(":")[0] in held_text


def test_heldout_batch_errors_and_short_split(tmp_path, corpus, smol_tokenizer):
    _, spec = corpus
    with pytest.raises(DataError, match="raise holdout_fraction"):
        heldout_batch(cfg_for(spec, holdout_fraction=0.0), smol_tokenizer, 64)
    with pytest.warns(UserWarning, match="fewer than"):
        ids, _ = heldout_batch(cfg_for(spec, max_rows=12), smol_tokenizer, 10_000)
    assert 0 < ids.shape[0] < 10_000 // 16


def test_check_context_size():
    from conftest import make_tiny_model
    gpt2 = make_tiny_model("gpt2", vocab_size=64, n_layers=1, d_model=8)  # n_positions=512
    check_context_size(DataConfig(context_size=512), gpt2)
    with pytest.raises(DataError, match="maximum of 512"):
        check_context_size(DataConfig(context_size=1024), gpt2)
    llama = make_tiny_model("llama", vocab_size=64, n_layers=1, d_model=8)  # max_position_embeddings=512
    with pytest.raises(DataError, match="512"):
        check_context_size(DataConfig(context_size=513), llama)


# ---------------------------------------------------------------------------------------------------------------
# built-in corpora (only the first held-out sequences are read)

def test_builtin_chat_heldout_segments(smol_tokenizer):
    cfg = DataConfig(data="chat", context_size=64)
    ids, segs = heldout_batch(cfg, smol_tokenizer, 256)
    assert ids.shape == (4, 64)
    assert (ids[:, 0] == smol_tokenizer.bos_token_id).all()
    codes = set(segs.unique().tolist())
    assert {SPECIAL, USER, ASSISTANT} <= codes
    im_start = smol_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert (segs[ids == im_start] == SPECIAL).all()
    # the batch starts with the held-out conversation of smallest sampling priority (from its start when it is
    # no longer than the per-document cap)
    held = [(document_priority(document_digest(d), cfg.heldout_seed), i, d)
            for i, d in enumerate(open_source("chat")) if is_heldout(d, cfg.holdout_fraction)]
    first = min(held)[2]
    first_ids, _ = tokenize_document(first, smol_tokenizer)
    assert len(first_ids) <= cfg.heldout_tokens_per_document
    n = min(64, len(first_ids))
    assert ids[0].tolist()[:n] == first_ids[:n]


def test_builtin_code_sequences(smol_tokenizer):
    cfg = dataclasses.replace(DataConfig(data="code", context_size=32), max_rows=30)
    seqs = list(islice(iter(TokenStream(cfg, smol_tokenizer)), 5))
    for ids, segs in seqs:
        assert int(ids[0]) == smol_tokenizer.bos_token_id and int(segs[0]) == SPECIAL
        assert set(segs[1:].tolist()) <= {TEXT, SPECIAL}
