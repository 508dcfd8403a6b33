"""Tokenization with segment labels, on the real SmolLM2 tokenizer: text BOS handling, chat labels checked by
decoding each labelled run back to the message it must equal, the template-rewrite and no-template fallbacks,
pre-tokenized input."""

from __future__ import annotations

import warnings

import pytest

from domain_sae.data.formatting import special_token_ids, tokenize_document, tokenize_documents
from domain_sae.data.segments import ASSISTANT, SPECIAL, SYSTEM, TEMPLATE, TEXT, USER
from domain_sae.data.sources import DataError, Document

CHAT = [{"role": "user", "content": "What is 2 + 2?\nPlease answer."},
        {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "user"},  # same text as the role name: must still be found as content
        {"role": "assistant", "content": "Yes, user."}]


def runs(ids, segs, code):
    """Maximal runs of consecutive positions labelled ``code``, as lists of ids."""
    out, cur = [], []
    for i, s in zip(ids, segs):
        if s == code:
            cur.append(i)
        elif cur:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


def test_text_gets_one_bos_and_text_labels(smol_tokenizer):
    tok = smol_tokenizer
    ids, segs = tokenize_document(Document(text="def f(x):\n    return x\n"), tok)
    plain = tok("def f(x):\n    return x\n", add_special_tokens=False)["input_ids"]
    assert ids == [tok.bos_token_id] + plain
    assert segs == [SPECIAL] + [TEXT] * len(plain)
    # already starting with BOS: not doubled
    ids2, segs2 = tokenize_document(Document(text="<|im_start|>hello"), tok)
    assert ids2[0] == tok.bos_token_id and ids2[1] != tok.bos_token_id and segs2[0] == SPECIAL
    # prepend_bos=False adds nothing
    ids3, _ = tokenize_document(Document(text="def f(x):\n    return x\n"), tok, prepend_bos=False)
    assert ids3 == plain


def test_special_tokens_inside_text_are_special(smol_tokenizer):
    ids, segs = tokenize_document(Document(text="a <|endoftext|> b"), smol_tokenizer)
    special = special_token_ids(smol_tokenizer)
    assert {0, 1, 2} <= special
    assert [s for i, s in zip(ids, segs) if i == 0] == [SPECIAL]
    assert all((s == SPECIAL) == (i in special) for i, s in zip(ids, segs))


def test_chat_labels_decode_to_the_messages(smol_tokenizer):
    tok = smol_tokenizer
    ids, segs = tokenize_document(Document(messages=CHAT), tok)
    rendered = tok.apply_chat_template(CHAT, tokenize=False)
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"]  # BOS (<|im_start|>) not doubled
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and segs[0] == SPECIAL
    assert len(ids) == len(segs)
    # every <|im_start|> / <|im_end|> is SPECIAL, and nothing else is
    marker_ids = {tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")}
    assert all((s == SPECIAL) == (i in marker_ids) for i, s in zip(ids, segs))
    # each user / assistant run decodes to exactly that message's content, in order
    assert [tok.decode(r) for r in runs(ids, segs, USER)] == [m["content"] for m in CHAT if m["role"] == "user"]
    assert [tok.decode(r) for r in runs(ids, segs, ASSISTANT)] == [m["content"] for m in CHAT
                                                                     if m["role"] == "assistant"]
    # the template's default system prompt and the role names are TEMPLATE
    template_text = "".join(tok.decode(r) for r in runs(ids, segs, TEMPLATE))
    assert "You are a helpful AI assistant named SmolLM" in template_text
    assert template_text.count("\nuser\n") == 2 and template_text.count("\nassistant\n") == 2
    assert SYSTEM not in segs and TEXT not in segs


def test_system_message_is_system(smol_tokenizer):
    msgs = [{"role": "system", "content": "Answer briefly."}] + CHAT[:2]
    ids, segs = tokenize_document(Document(messages=msgs), smol_tokenizer)
    assert [smol_tokenizer.decode(r) for r in runs(ids, segs, SYSTEM)] == ["Answer briefly."]
    assert "SmolLM" not in smol_tokenizer.decode(ids)  # a given system message replaces the default prompt


def test_template_that_rewrites_content_falls_back_to_search(smol_tokenizer, monkeypatch):
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
                "{% endfor %}")
    monkeypatch.setattr(smol_tokenizer, "chat_template", template)
    msgs = [{"role": "user", "content": "  padded question  "}, {"role": "assistant", "content": "answer"}]
    ids, segs = tokenize_document(Document(messages=msgs), smol_tokenizer)
    assert [smol_tokenizer.decode(r) for r in runs(ids, segs, USER)] == ["padded question"]
    assert [smol_tokenizer.decode(r) for r in runs(ids, segs, ASSISTANT)] == ["answer"]


def test_no_chat_template_fallback_warns_once(smol_tokenizer, monkeypatch):
    monkeypatch.setattr(smol_tokenizer, "chat_template", None)
    import domain_sae.data.formatting as fmt
    monkeypatch.setattr(fmt, "_warned_fallback", type(fmt._warned_fallback)())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = tokenize_documents([Document(messages=CHAT[:2]), Document(messages=CHAT[2:])], smol_tokenizer)
    fallback = [w for w in caught if "no chat template" in str(w.message)]
    assert len(fallback) == 1 and "User: " in str(fallback[0].message)
    ids, segs = out[0]
    assert smol_tokenizer.decode(ids[1:]) == "User: What is 2 + 2?\nPlease answer.\nAssistant: It is 4.\n"
    assert ids[0] == smol_tokenizer.bos_token_id and segs[0] == SPECIAL
    # the token " What" straddles "User: " and the content: it takes the content's label
    assert [smol_tokenizer.decode(r) for r in runs(ids, segs, USER)] == [" " + CHAT[0]["content"]]
    assert [smol_tokenizer.decode(r) for r in runs(ids, segs, ASSISTANT)] == [" " + CHAT[1]["content"]]
    assert [smol_tokenizer.decode(r) for r in runs(ids, segs, TEMPLATE)] == ["User:", "\nAssistant:", "\n"]


def test_pretokenized_ids_as_given(smol_tokenizer):
    ids, segs = tokenize_document(Document(input_ids=[1, 500, 600, 2]), smol_tokenizer)
    assert ids == [1, 500, 600, 2]
    assert segs == [SPECIAL, TEXT, TEXT, SPECIAL]
    with pytest.raises(DataError, match="outside the tokenizer's vocabulary"):
        tokenize_document(Document(input_ids=[1, 10**7]), smol_tokenizer)


def test_batch_equals_single(smol_tokenizer):
    docs = [Document(text="x = 1\n"), Document(messages=CHAT[:2]), Document(input_ids=[5, 6]),
            Document(text="Hello there.")]
    assert tokenize_documents(docs, smol_tokenizer) == [tokenize_document(d, smol_tokenizer) for d in docs]


class _NoBosTokenizer:
    """The SmolLM2 tokenizer seen as a GPT-2-style tokenizer without a BOS token."""
    bos_token_id = None

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, *a, **kw):
        return self._tok(*a, **kw)

    def __len__(self):
        return len(self._tok)


def test_eos_is_the_separator_without_bos(smol_tokenizer):
    ids, segs = tokenize_document(Document(text="hi"), _NoBosTokenizer(smol_tokenizer))
    assert ids[0] == smol_tokenizer.eos_token_id and segs[0] == SPECIAL
