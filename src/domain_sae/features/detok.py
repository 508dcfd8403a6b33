"""Per-token display text that is faithful to the decoded string.

Byte-level BPE splits one multi-byte character (an emoji, an accented letter) over several tokens, and decoding
such a token alone gives U+FFFD. :func:`token_texts` decodes incrementally (the streaming-detokenizer rule): token
k's text is ``decode(ids[p:k+1])[len(decode(ids[p:r])):]`` with ``p``/``r`` the start of the last emitted chunk
and the first unemitted token; while the decoded tail ends in an incomplete character (U+FFFD) the tokens wait,
and the completed character is put on the token that completes it. Concatenating the texts gives
``decode(ids)`` (sentencepiece leading spaces included, special tokens shown as their strings).
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """One display string per token; tokens whose bytes are completed later get ``""`` (merged into the next)."""
    ids = [int(i) for i in ids]
    out: list[str] = []
    prefix, read = 0, 0
    for k in range(len(ids)):
        prefix_text = _decode(tokenizer, ids[prefix:read])
        new_text = _decode(tokenizer, ids[prefix:k + 1])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT) \
                and new_text.startswith(prefix_text):
            out.extend([""] * (k - read))
            out.append(new_text[len(prefix_text):])
            prefix, read = read, k + 1
        elif k == len(ids) - 1:  # the sequence ends inside a character: show what there is on the last token
            tail = new_text.removeprefix(prefix_text)
            out.extend([""] * (k - read))
            out.append(tail)
    return out


def single_token_text(tokenizer, token_id: int) -> str:
    """Text of one token on its own (for logit tables); a partial character is shown as its token string."""
    s = _decode(tokenizer, [token_id])
    if REPLACEMENT in s:
        try:
            return str(tokenizer.convert_ids_to_tokens(int(token_id)))
        except Exception:  # noqa: BLE001 - tokenizers without the method
            return s
    return s
