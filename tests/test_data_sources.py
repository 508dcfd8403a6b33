"""Document sources: local files (jsonl, json, parquet, txt, directories), column detection and its errors, chat
normalisation, empty data, the offline hub fast path, and the built-in chat and code corpora (first documents only)."""

from __future__ import annotations

import json
import sysconfig
from itertools import islice
from pathlib import Path

import pytest

from domain_sae.data.sources import (DataError, Document, hub_offline_reason, open_source, stdlib_files)


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _docs(spec, **kw):
    return list(open_source(str(spec), **kw))


def test_jsonl_text_column_detected(tmp_path):
    p = _write_jsonl(tmp_path / "d.jsonl", [{"id": 1, "text": "alpha"}, {"id": 2, "text": "beta"},
                                            {"id": 3, "text": "   "}])
    docs = _docs(p)
    assert [d.text for d in docs] == ["alpha", "beta"]  # the whitespace-only row is skipped
    assert all(d.kind == "text" for d in docs)


def test_jsonl_chat_and_sharegpt_columns(tmp_path):
    p = _write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}])
    (d,) = _docs(p)
    assert d.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    p2 = _write_jsonl(tmp_path / "s.jsonl", [
        {"conversations": [{"from": "system", "value": "be nice"}, {"from": "human", "value": "q"},
                           {"from": "gpt", "value": "a"}]}])
    (d2,) = _docs(p2)
    assert [m["role"] for m in d2.messages] == ["system", "user", "assistant"]
    assert [m["content"] for m in d2.messages] == ["be nice", "q", "a"]


def test_pretokenized_column(tmp_path):
    p = _write_jsonl(tmp_path / "t.jsonl", [{"input_ids": [1, 5, 7]}, {"input_ids": [1, 9]}])
    assert [d.input_ids for d in _docs(p)] == [[1, 5, 7], [1, 9]]


def test_explicit_column_and_value_types_decide(tmp_path):
    p = _write_jsonl(tmp_path / "x.jsonl", [{"body": "some text", "ids": [3, 4], "conv": [
        {"role": "user", "content": "u"}]}])
    assert _docs(p, column="body")[0].text == "some text"
    assert _docs(p, column="ids")[0].input_ids == [3, 4]
    assert _docs(p, column="conv")[0].messages == [{"role": "user", "content": "u"}]


def test_missing_column_errors_list_columns(tmp_path):
    p = _write_jsonl(tmp_path / "x.jsonl", [{"body": "t", "meta": 1}])
    with pytest.raises(DataError, match=r"'body'.*'meta'.*--data-column"):
        _docs(p)
    with pytest.raises(DataError, match=r"'nope' is not in.*'body', 'meta'"):
        _docs(p, column="nope")


def test_unusable_value_type(tmp_path):
    p = _write_jsonl(tmp_path / "x.jsonl", [{"text": 3.5}])
    with pytest.raises(DataError, match="float"):
        _docs(p)


def test_parquet_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"other": [1, 2, 3], "text": ["one", "two", ""]})
    pq.write_table(table, tmp_path / "d.parquet")
    assert [d.text for d in _docs(tmp_path / "d.parquet")] == ["one", "two"]
    with pytest.raises(DataError, match=r"columns found: 'other', 'text'"):
        _docs(tmp_path / "d.parquet", column="content")
    pq.write_table(pa.table({"input_ids": [[1, 2], [3]]}), tmp_path / "ids.parquet")
    assert [d.input_ids for d in _docs(tmp_path / "ids.parquet")] == [[1, 2], [3]]


def test_json_list_and_columnar(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": "x"}, {"text": "y"}]))
    (tmp_path / "b.json").write_text(json.dumps({"text": ["p", "q"], "label": [0, 1]}))
    assert [d.text for d in _docs(tmp_path / "a.json")] == ["x", "y"]
    assert [d.text for d in _docs(tmp_path / "b.json")] == ["p", "q"]


def test_txt_file_is_one_document(tmp_path):
    (tmp_path / "f.txt").write_text("line one\n\nline two\r\n")
    (d,) = _docs(tmp_path / "f.txt")
    assert d.text == "line one\n\nline two\r\n"  # kept intact, no newline translation


def test_directory_of_text_files_sorted_binary_skipped(tmp_path):
    (tmp_path / "b.py").write_text("print('b')\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.md").write_text("# a\n")
    (tmp_path / "a.txt").write_text("a text\n")
    (tmp_path / "img.bin").write_bytes(b"\x89PNG\x00\x01\x02")
    (tmp_path / ".hidden").write_text("secret\n")
    assert [d.text for d in _docs(tmp_path)] == ["a text\n", "print('b')\n", "# a\n"]  # a.txt, b.py, sub/a.md


def test_directory_of_tables(tmp_path):
    _write_jsonl(tmp_path / "part-0.jsonl", [{"text": "first"}])
    _write_jsonl(tmp_path / "part-1.jsonl", [{"text": "second"}])
    assert [d.text for d in _docs(tmp_path)] == ["first", "second"]


def test_empty_dataset_errors(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match="no documents"):
        _docs(tmp_path / "e.jsonl")
    _write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": "  \n"}])
    with pytest.raises(DataError, match="no documents"):
        _docs(tmp_path / "blank.jsonl")


def test_missing_path_is_not_a_hub_lookup(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_source(str(tmp_path / "missing.parquet"))
    (tmp_path / "f.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        open_source(str(tmp_path / "f.csv"))


def test_offline_hub_id_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"someuser/some-dataset.*HF_HUB_OFFLINE.*parquet.*chat.*code"):
        open_source("someuser/some-dataset")


def test_unreachable_hub_host_is_detected(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens, refused at once
    reason = hub_offline_reason(timeout_s=1.0)
    assert reason is not None and "127.0.0.1:9" in reason
    with pytest.raises(DataError, match="unreachable"):
        open_source("someuser/other-dataset")


def test_document_needs_exactly_one_field():
    with pytest.raises(DataError):
        Document()
    with pytest.raises(DataError):
        Document(text="a", input_ids=[1])


def test_builtin_chat_first_conversations():
    import importlib.util
    src = open_source("chat")
    docs = list(islice(iter(src), 3))
    root = Path(list(importlib.util.find_spec("chitchat_dataset").submodule_search_locations)[0])
    raw = json.loads((root / "dataset.json").read_text())
    first_id = sorted(raw)[0]
    turns = raw[first_id]["messages"]
    expected = ["\n".join(m["text"] for m in turn) for turn in turns]
    assert [m["content"] for m in docs[0].messages] == expected
    for d in docs:
        roles = [m["role"] for m in d.messages]
        assert roles[0] == "user"
        assert all(a != b for a, b in zip(roles, roles[1:]))  # alternating
        assert set(roles) <= {"user", "assistant"}
    assert [m["content"] for m in docs[1].messages][0] == "\n".join(
        m["text"] for m in raw[sorted(raw)[1]]["messages"][0])


def test_builtin_code_is_stdlib_without_tests():
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [p.relative_to(root).as_posix() for p in files]
    assert rel == sorted(rel)
    assert all(not ({"test", "tests", "site-packages"} & set(Path(r).parts)) for r in rel)
    assert any(r == "json/decoder.py" for r in rel)
    docs = list(islice(iter(open_source("code")), 3))
    texts = (p.read_bytes().decode("utf-8") for p in files)
    nonempty = list(islice((t for t in texts if t.strip()), 3))
    assert [d.text for d in docs] == nonempty  # byte-for-byte, in sorted order


@pytest.mark.parametrize("iterable", [False, True])
def test_hub_path_reads_the_detected_column(monkeypatch, iterable):
    """The hub branch with datasets.load_dataset replaced by an in-memory dataset (no network here)."""
    datasets = pytest.importorskip("datasets")
    import domain_sae.data.sources as sources
    ds = datasets.Dataset.from_dict({"id": [1, 2], "conversations": [
        [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"}],
        [{"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]]})
    if iterable:
        ds = ds.to_iterable_dataset()
    calls = []

    def fake_load(spec, split, streaming):
        calls.append((spec, split, streaming))
        return ds

    monkeypatch.setattr(sources, "hub_offline_reason", lambda *a, **k: None)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    src = open_source("someone/chats", split="validation")
    docs = list(src) + list(src)  # re-iterable
    assert calls == [("someone/chats", "validation", True)]
    assert [d.messages[1]["content"] for d in docs] == ["a1", "a2", "a1", "a2"]
    assert docs[0].messages[0] == {"role": "user", "content": "q1"}
    with pytest.raises(DataError, match=r"'id', 'conversations'"):
        list(open_source("someone/chats", column="text"))
