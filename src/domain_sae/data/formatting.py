"""Documents -> token ids plus one segment code per token (see :mod:`domain_sae.data.segments`).

Text documents
    Tokenized without letting the tokenizer add special tokens itself. With ``prepend_bos`` a BOS is put in front
    unless the ids already start with it. BOS is ``tokenizer.bos_token_id``, or ``eos_token_id`` for tokenizers
    without one (GPT-2 style: ``<|endoftext|>`` separates documents). Tokens whose id is a special token (BOS/EOS/pad
    and the tokenizer's other special added tokens) are ``SPECIAL``; all others ``TEXT``.

Chat documents
    Rendered to a string with ``tokenizer.apply_chat_template(messages, tokenize=False)`` (a template may add text
    of its own, e.g. SmolLM2's default system prompt), tokenized with character offsets, and every token labelled:
    ``SPECIAL`` for special tokens, else the role of the message content it overlaps most (``USER``,
    ``ASSISTANT``, ``SYSTEM``; content of any other role, e.g. ``tool``, is ``TEXT``), else ``TEMPLATE`` (role names,
    newlines, a template's default system prompt). Content spans are found exactly by rendering once with a unique
    placeholder per message; a template that rewrites content (e.g. trims it) falls back to searching each
    message's content (then its stripped form) in the rendered string, left to right. BOS is prepended as for text
    when the rendered ids do not start with it (so SmolLM2's leading ``<|im_start|>``, its BOS, is never doubled).
    A tokenizer without a chat template uses the plain format ``"User: {content}\\n"`` / ``"Assistant:
    {content}\\n"`` / ``"System: {content}\\n"`` (role name capitalised, prefix and newline ``TEMPLATE``) and
    warns once per tokenizer.

Pre-tokenized documents
    The ids exactly as given (no BOS added); special ids ``SPECIAL``, others ``TEXT``.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Optional, Sequence

import numpy as np

from .segments import ROLE_SEGMENT, SPECIAL, TEMPLATE, TEXT
from .sources import DataError, Document

__all__ = ["FALLBACK_CHAT_FORMAT", "bos_token_id", "special_token_ids", "render_chat", "tokenize_document",
           "tokenize_documents"]

FALLBACK_CHAT_FORMAT = "{Role}: {content}\\n per message (User: ...\\nAssistant: ...\\n)"
_PLACEHOLDER = "\ue000{}\ue001"  # private-use characters: never part of real text
_CONTENT_LABELS = (TEXT,) + tuple(sorted(set(ROLE_SEGMENT.values())))
_warned_fallback: "weakref.WeakSet" = weakref.WeakSet()
_warned_fallback_ids: set[int] = set()


def bos_token_id(tokenizer) -> Optional[int]:
    """The document separator: ``bos_token_id``, else ``eos_token_id`` (GPT-2 style), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if bos is not None else getattr(tokenizer, "eos_token_id", None)


def special_token_ids(tokenizer) -> frozenset[int]:
    """``all_special_ids`` plus every added token the tokenizer marks as special."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for idx, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(idx))
    return frozenset(ids)


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _warn_fallback_once(tokenizer) -> None:
    try:
        if tokenizer in _warned_fallback:
            return
        _warned_fallback.add(tokenizer)
    except TypeError:  # not weak-referenceable
        if id(tokenizer) in _warned_fallback_ids:
            return
        _warned_fallback_ids.add(id(tokenizer))
    name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
    warnings.warn(f"The tokenizer {name!r} has no chat template; chat documents are rendered in the plain fallback "
                  f"format {FALLBACK_CHAT_FORMAT}. Use a chat model's tokenizer for template-faithful chats.",
                  stacklevel=3)


def _fallback_render(messages: list[dict]) -> tuple[str, list[tuple[int, int, int]]]:
    parts, spans, pos = [], [], 0
    for m in messages:
        prefix = f"{m['role'].capitalize()}: "
        start = pos + len(prefix)
        parts.append(prefix + m["content"] + "\n")
        spans.append((start, start + len(m["content"]), ROLE_SEGMENT.get(m["role"], TEXT)))
        pos = start + len(m["content"]) + 1
    return "".join(parts), spans


def _template_render(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int, int]]]:
    def apply(msgs):
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False)
        except Exception as e:  # jinja TemplateError (e.g. roles must alternate), ...
            raise DataError(f"The chat template of the tokenizer cannot render a conversation "
                            f"({type(e).__name__}: {e}); roles: {[m['role'] for m in msgs]}.") from None

    rendered = apply(messages)
    labels = [ROLE_SEGMENT.get(m["role"], TEXT) for m in messages]
    # Exact spans: render with one unique placeholder per message content and put the contents back.
    marks = [_PLACEHOLDER.format(i) for i in range(len(messages))]
    templ = apply([{**m, "content": mk} for m, mk in zip(messages, marks)])
    if all(templ.count(mk) == 1 for mk in marks):
        out, spans, pos = [], [], 0
        for mk, m, lab in zip(marks, messages, labels):
            i = templ.find(mk, pos)
            if i < 0:
                break
            out.append(templ[pos:i])
            start = sum(map(len, out))
            out.append(m["content"])
            spans.append((start, start + len(m["content"]), lab))
            pos = i + len(mk)
        else:
            out.append(templ[pos:])
            if "".join(out) == rendered:
                return rendered, spans
    # The template rewrites content: search each message's content left to right.
    spans, cursor = [], 0
    for m, lab in zip(messages, labels):
        for needle in (m["content"], m["content"].strip()):
            i = rendered.find(needle, cursor) if needle else -1
            if i >= 0:
                spans.append((i, i + len(needle), lab))
                cursor = i + len(needle)
                break
    return rendered, spans


def render_chat(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int, int]], bool]:
    """``(rendered, spans, used_template)``: the conversation as a string and the character spans
    ``(start, end, segment_code)`` of each message's content in it."""
    if _has_chat_template(tokenizer):
        text, spans = _template_render(messages, tokenizer)
        return text, spans, True
    _warn_fallback_once(tokenizer)
    text, spans = _fallback_render(messages)
    return text, spans, False


def _label_tokens(ids: list[int], offsets, n_chars: int, spans, special: frozenset[int]) -> list[int]:
    """Per token: SPECIAL for special ids; else the content label covering most of its characters; else
    TEMPLATE."""
    char_lab = np.full(n_chars, TEMPLATE, dtype=np.int8)
    for s, e, lab in spans:
        char_lab[s:e] = lab
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    rows = []
    for lab in _CONTENT_LABELS:  # characters of label `lab` inside each token = prefix-sum difference
        csum = np.concatenate([[0], np.cumsum(char_lab == lab)])
        rows.append(csum[off[:, 1]] - csum[off[:, 0]])
    counts = np.stack(rows)
    best = np.asarray(_CONTENT_LABELS, dtype=np.int64)[counts.argmax(axis=0)]
    segs = np.where(counts.max(axis=0) > 0, best, TEMPLATE)
    if special:
        segs = np.where(np.isin(np.asarray(ids, dtype=np.int64), np.fromiter(special, dtype=np.int64)), SPECIAL, segs)
    return segs.astype(int).tolist()


def _with_bos(ids: list[int], segs: list[int], bos: Optional[int], prepend_bos: bool):
    if prepend_bos and (not ids or ids[0] != bos):
        return [bos] + ids, [SPECIAL] + segs
    return ids, segs


def _text_segments(ids: list[int], special: frozenset[int]) -> list[int]:
    return [SPECIAL if i in special else TEXT for i in ids]


def tokenize_documents(docs: Sequence[Document], tokenizer, prepend_bos: bool = True
                       ) -> list[tuple[list[int], list[int]]]:
    """:func:`tokenize_document` for a batch of documents (one tokenizer call per kind), in the same order."""
    special = special_token_ids(tokenizer)
    bos = bos_token_id(tokenizer)
    if prepend_bos and bos is None and any(d.kind != "ids" for d in docs):
        raise DataError("The tokenizer has neither a BOS nor an EOS token to put in front of each document; set "
                        "prepend_bos to false.")
    out: list = [None] * len(docs)

    text_idx = [i for i, d in enumerate(docs) if d.kind == "text"]
    if text_idx:
        enc = tokenizer([docs[i].text for i in text_idx], add_special_tokens=False, verbose=False)["input_ids"]
        for i, ids in zip(text_idx, enc):
            ids = list(ids)
            out[i] = _with_bos(ids, _text_segments(ids, special), bos, prepend_bos)

    chat_idx = [i for i, d in enumerate(docs) if d.kind == "chat"]
    if chat_idx:
        rendered = [render_chat(docs[i].messages, tokenizer) for i in chat_idx]
        try:
            enc = tokenizer([r[0] for r in rendered], add_special_tokens=False, return_offsets_mapping=True,
                            verbose=False)
        except NotImplementedError:
            raise DataError("Labelling chat tokens needs character offsets, which only 'fast' tokenizers give; load "
                            "the tokenizer with use_fast=True.") from None
        for i, (text, spans, _), ids, offs in zip(chat_idx, rendered, enc["input_ids"], enc["offset_mapping"]):
            ids = list(ids)
            out[i] = _with_bos(ids, _label_tokens(ids, offs, len(text), spans, special), bos, prepend_bos)

    vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    for i, d in enumerate(docs):
        if d.kind == "ids":
            ids = [int(x) for x in d.input_ids]
            if vocab is not None and ids and (max(ids) >= vocab or min(ids) < 0):
                raise DataError(f"A pre-tokenized document holds token id {max(ids) if max(ids) >= vocab else min(ids)}"
                                f", outside the tokenizer's vocabulary of {vocab}: the data was tokenized for another "
                                f"model. Use the matching model, or the text column of the dataset.")
            out[i] = (ids, _text_segments(ids, special))
    return out


def tokenize_document(doc: Document, tokenizer, prepend_bos: bool = True) -> tuple[list[int], list[int]]:
    """``(ids, segments)`` of one document, one segment code per id (rules in the module docstring)."""
    return tokenize_documents([doc], tokenizer, prepend_bos)[0]
