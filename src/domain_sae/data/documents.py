"""Documents and how table rows become them (the vocabulary every data source shares).

A :class:`Document` is text, a chat (list of ``{role, content}``) or pre-tokenized ids; a :class:`DocumentSource`
is a re-iterable of them with a description. Column detection and value conversion are described in
:mod:`.sources`.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

from ..errors import UserError

class DataError(UserError, ValueError):
    """A dataset cannot be used as asked (missing column, empty data, unreadable file, hub unreachable); the
    message names the problem and the fix."""


TEXT_COLUMNS = ("text",)
CHAT_COLUMNS = ("messages", "conversation", "conversations")
IDS_COLUMNS = ("input_ids", "tokens")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
                   "system": "system"}


# ----------------------------------------------------------------------------------------------------------------
# Documents

@dataclass(frozen=True)
class Document:
    """One document: exactly one of ``text``, ``messages`` (``[{"role": str, "content": str}, ...]``) or
    ``input_ids`` is set."""

    text: Optional[str] = None
    messages: Optional[list] = None
    input_ids: Optional[list] = None

    def __post_init__(self):
        n_set = sum(x is not None for x in (self.text, self.messages, self.input_ids))
        if n_set != 1:
            raise DataError(f"A Document holds exactly one of text, messages or input_ids (got {n_set}).")

    @property
    def kind(self) -> str:
        """``"text"``, ``"chat"`` or ``"ids"``."""
        if self.text is not None:
            return "text"
        return "chat" if self.messages is not None else "ids"

    def is_empty(self) -> bool:
        if self.text is not None:
            return not self.text.strip()
        if self.messages is not None:
            return not self.messages
        return not self.input_ids


class DocumentSource:
    """Re-iterable stream of documents in a fixed order. Every ``iter()`` starts from the first document.

    ``description`` says in words what the source is (shown in logs and errors). Iterating a source that yields no
    non-empty document raises :class:`DataError`."""

    def __init__(self, spec: str, description: str, factory: Callable[[], Iterable[Document]]):
        self.spec = spec
        self.description = description
        self._factory = factory

    def __iter__(self) -> Iterator[Document]:
        n = 0
        for doc in self._factory():
            if doc is None or doc.is_empty():
                continue
            n += 1
            yield doc
        if n == 0:
            raise DataError(f"The dataset {self.spec!r} ({self.description}) holds no documents (it is empty, or "
                            f"every row is empty). Check the file/split, or choose another --data-column.")

    def __repr__(self) -> str:
        return f"DocumentSource({self.spec!r}: {self.description})"


# ----------------------------------------------------------------------------------------------------------------
# Values and columns

def normalize_messages(raw: Any, where: str = "") -> list[dict]:
    """``[{"role", "content"}]`` from a list of ``{role, content}`` or ShareGPT ``{from, value}`` dicts.

    ``content`` may be None (-> ``""``) or a list of OpenAI-style parts (their ``text`` fields joined with
    ``"\\n"``). ShareGPT senders human/gpt/system map to user/assistant/system."""
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise DataError(f"Message {i} of a conversation{where} is a {type(m).__name__}, not a dict with "
                            f"role/content (or ShareGPT from/value).")
        if "role" in m and "content" in m:
            role, content = m["role"], m["content"]
        elif "from" in m and "value" in m:
            role, content = _SHAREGPT_ROLES.get(str(m["from"]).lower(), str(m["from"])), m["value"]
        else:
            raise DataError(f"Message {i} of a conversation{where} has keys {sorted(m)}; expected role and content "
                            f"(or ShareGPT from and value).")
        if content is None:
            content = ""
        elif isinstance(content, list):  # multimodal parts: keep the text ones
            content = "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("text"))
        elif not isinstance(content, str):
            raise DataError(f"Message {i} of a conversation{where} has content of type {type(content).__name__}; "
                            f"expected a string.")
        out.append({"role": str(role), "content": content})
    return out


def _is_int(x) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def value_to_document(value: Any, where: str = "") -> Optional[Document]:
    """Document from one cell: a string is text, a list of dicts a chat, a list of integers token ids,
    None an empty row (returns None)."""
    if value is None:
        return None
    if isinstance(value, str):
        return Document(text=value)
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):  # numpy / torch arrays
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if not value:
            return None
        if all(isinstance(v, dict) for v in value):
            return Document(messages=normalize_messages(value, where))
        if all(_is_int(v) for v in value):
            return Document(input_ids=[int(v) for v in value])
    raise DataError(f"Cannot read a value of type {type(value).__name__}{where} as a document: expected a string "
                    f"(text), a list of {{role, content}} messages (chat) or a list of integers (token ids). Choose "
                    f"another column with --data-column.")


def detect_column(columns: Iterable[str], column: Optional[str], where: str) -> str:
    """The column to read: ``column`` when given (it must exist), else the first of ``text``; ``messages``,
    ``conversation``, ``conversations``; ``input_ids``, ``tokens`` that exists."""
    cols = list(columns)
    if column is not None:
        if column not in cols:
            found = ", ".join(map(repr, cols)) or "none"
            raise DataError(f"Column {column!r} is not in {where}; columns found: {found}."
                            f" Pass one of them with --data-column.")
        return column
    for c in TEXT_COLUMNS + CHAT_COLUMNS + IDS_COLUMNS:
        if c in cols:
            return c
    raise DataError(f"Cannot tell which column of {where} holds the documents: none of "
                    f"{', '.join(TEXT_COLUMNS + CHAT_COLUMNS + IDS_COLUMNS)} is present; columns found: "
                    f"{', '.join(map(repr, cols)) or 'none'}. Pass the column with --data-column (e.g. "
                    f"--data-column {cols[0] if cols else 'content'}).")


def _rows_to_documents(rows: Iterable[Any], column: Optional[str], where: str) -> Iterator[Document]:
    """Documents from dict rows (or bare strings/lists); the column is detected on the first dict row."""
    chosen: Optional[str] = None
    for i, row in enumerate(rows):
        if isinstance(row, dict):
            if chosen is None:
                chosen = detect_column(row.keys(), column, where)
            yield value_to_document(row.get(chosen), f" (row {i} of {where}, column {chosen!r})")
        else:
            yield value_to_document(row, f" (row {i} of {where})")


# ----------------------------------------------------------------------------------------------------------------
# Built-in sources
