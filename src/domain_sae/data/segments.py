"""Segment codes: one int8 label per token position saying what kind of text the token belongs to.

=========  ====  ==================================================================================
name       code  meaning
=========  ====  ==================================================================================
pad          -1  padding (only with ``one_document_per_sequence``); never trained or evaluated on
special       0  special tokens: BOS/EOS/pad and chat-template markers (``<|im_start|>``, ...)
text          1  plain text or code
user          2  content of a user message
assistant     3  content of an assistant message
template      4  non-special chat-template text: role names, newlines, a template's default system prompt
system        5  content of a system message given in the conversation
=========  ====  ==================================================================================

The positions an SAE trains on are given by :func:`training_mask`.
"""

from __future__ import annotations

import torch

PAD = -1
SPECIAL = 0
TEXT = 1
USER = 2
ASSISTANT = 3
TEMPLATE = 4
SYSTEM = 5

SEGMENT_NAMES: dict[int, str] = {
    PAD: "pad",
    SPECIAL: "special",
    TEXT: "text",
    USER: "user",
    ASSISTANT: "assistant",
    TEMPLATE: "template",
    SYSTEM: "system",
}
SEGMENT_CODES: dict[str, int] = {v: k for k, v in SEGMENT_NAMES.items()}

#: Segment label of the content of a chat message, by role (other roles, e.g. ``tool``, count as ``text``).
ROLE_SEGMENT: dict[str, int] = {"user": USER, "assistant": ASSISTANT, "system": SYSTEM}

SEGMENT_DTYPE = torch.int8

__all__ = ["PAD", "SPECIAL", "TEXT", "USER", "ASSISTANT", "TEMPLATE", "SYSTEM", "SEGMENT_NAMES", "SEGMENT_CODES",
           "ROLE_SEGMENT", "SEGMENT_DTYPE", "segment_name", "training_mask"]


def segment_name(code: int) -> str:
    """Human name of a segment code (``user``, ``assistant``, ...); ``segment_<code>`` for unknown codes."""
    return SEGMENT_NAMES.get(int(code), f"segment_{int(code)}")


def training_mask(segments: torch.Tensor, exclude_special: bool) -> torch.Tensor:
    """Boolean mask of the positions an SAE trains/evaluates on, same shape as ``segments``:

    ``mask = (segments != PAD) & (segments != SPECIAL if exclude_special else True)``.

    Padding is never used; special tokens (BOS, chat markers) only when ``exclude_special`` is False.
    """
    mask = segments != PAD
    if exclude_special:
        mask &= segments != SPECIAL
    return mask
