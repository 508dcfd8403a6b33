"""k-sparse probing: Python token-type labels (vs hand-labelled spans and the real tokenizer), chat turn labels,
balanced splits, latent selection, the logistic probe (vs scipy's optimiser on the same objective) and synthetic
tasks whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from domain_sae.analysis.probing import (PY_TOKEN_TYPES, balanced_split, chat_turn_labels, code_probe_tokens,
                                         fit_logistic, label_tokens_by_chars, probe_accuracy, probe_all,
                                         python_char_types, select_latents)
from domain_sae.data.segments import ASSISTANT, SPECIAL, TEMPLATE, USER

T = {name: i for i, name in enumerate(PY_TOKEN_TYPES)}


def _spans(source: str, types: np.ndarray) -> list[tuple[str, str]]:
    """(text, type) runs of labelled characters."""
    out, i = [], 0
    while i < len(source):
        if types[i] < 0:
            i += 1
            continue
        j = i
        while j < len(source) and types[j] == types[i]:
            j += 1
        out.append((source[i:j], PY_TOKEN_TYPES[types[i]]))
        i = j
    return out


def test_python_char_types_by_hand():
    src = "def f(x):\n    return x + 1.5  # add\ns = 'a' if x else f\"{x}\"\n"
    got = _spans(src, python_char_types(src))
    assert got[:8] == [("def", "KEYWORD"), ("f", "NAME"), ("(", "OP"), ("x", "NAME"), ("):", "OP"),
                       ("return", "KEYWORD"), ("x", "NAME"), ("+", "OP")]
    assert ("1.5", "NUMBER") in got and ("# add", "COMMENT") in got and ("'a'", "STRING") in got
    assert ("if", "KEYWORD") in got and ("else", "KEYWORD") in got
    # the f-string is a STRING as a whole (its braces are OP on Python >= 3.12, where f-strings are tokenized)
    fs = src.index('f"')
    assert PY_TOKEN_TYPES[python_char_types(src)[fs]] == "STRING"
    assert python_char_types(src)[src.index("    return")] == -1   # indentation is unlabelled


def test_python_char_types_survives_bad_source():
    src = "x = 1\ny = (2,\n"            # unclosed bracket: tokenize fails at EOF
    types = python_char_types(src)
    assert types[0] == T["NAME"] and types[src.index("1")] == T["NUMBER"]


def test_label_tokens_by_chars_majority():
    chars = np.array([0, 0, 1, -1, -1, 2, 2, 2, 1], dtype=np.int8)
    offsets = [(0, 3), (3, 5), (4, 8), (2, 3), (8, 9), (1, 3)]
    got = label_tokens_by_chars(offsets, chars, 3)
    assert got.tolist() == [0, -1, 2, 1, 1, 0]  # (1, 3): one char of 0 and one of 1 -> tie -> lower label


def test_code_probe_tokens_with_real_tokenizer(smol_tokenizer):
    src = "import os\n\ndef main(path):\n    # read it\n    return os.path.join(path, 'x', 42)\n"
    ids, labels = code_probe_tokens([src], smol_tokenizer, 16, max_tokens=1000,
                                    bos_id=smol_tokenizer.bos_token_id, pad_id=0)
    assert ids.shape == labels.shape and ids.shape[1] == 16
    assert (ids[:, 0] == smol_tokenizer.bos_token_id).all() and (labels[:, 0] == -1).all()
    flat_ids, flat_lab = ids[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
    by_piece = {}
    for i, lab in zip(flat_ids.tolist(), flat_lab.tolist()):
        if lab >= 0:
            by_piece.setdefault(smol_tokenizer.decode([i]).strip(), set()).add(PY_TOKEN_TYPES[lab])
    assert by_piece["import"] == {"KEYWORD"} and by_piece["def"] == {"KEYWORD"} and by_piece["return"] == {"KEYWORD"}
    assert by_piece["os"] == {"NAME"} and by_piece["main"] == {"NAME"}
    assert by_piece["4"] == {"NUMBER"}                    # SmolLM2 splits numbers into digits
    assert any("OP" in v for piece, v in by_piece.items() if "(" in piece)
    assert any("COMMENT" in v for v in by_piece.values()) and any("STRING" in v for v in by_piece.values())
    # the same tokens as tokenizing the source at once
    n = int((flat_ids != 0).sum())
    assert flat_ids[:n].tolist() == smol_tokenizer(src, add_special_tokens=False)["input_ids"][:n]


def test_code_probe_windows_per_document(smol_tokenizer):
    src = "\n".join(f"x{i} = {i}  # n" for i in range(60))
    all_ids, _ = code_probe_tokens([src], smol_tokenizer, 16, max_tokens=10_000, bos_id=None)
    one, _ = code_probe_tokens([src], smol_tokenizer, 16, max_tokens=10_000, bos_id=None, windows_per_document=1)
    three, _ = code_probe_tokens([src], smol_tokenizer, 16, max_tokens=10_000, bos_id=None, windows_per_document=3)
    n = all_ids.shape[0]
    assert torch.equal(one[0], all_ids[n // 2])                        # the middle window
    assert torch.equal(three, all_ids[[0, round((n - 1) / 2), n - 1]])  # first, middle, last


def test_chat_turn_labels():
    segs = torch.tensor([[SPECIAL, TEMPLATE, USER, USER, TEMPLATE, ASSISTANT, -1]], dtype=torch.int8)
    assert chat_turn_labels(segs).tolist() == [[-1, -1, 0, 0, -1, 1, -1]]


def test_balanced_split():
    y = np.array([1] * 30 + [0] * 500)
    train, test = balanced_split(y, max_per_class=1000, test_fraction=0.3, seed=0)
    assert set(train).isdisjoint(test)
    assert (y[train] == 1).sum() == (y[train] == 0).sum() == 21
    assert (y[test] == 1).sum() == (y[test] == 0).sum() == 9
    again = balanced_split(y, max_per_class=1000, test_fraction=0.3, seed=0)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    assert len(balanced_split(np.zeros(10), max_per_class=5, test_fraction=0.3, seed=0)[0]) == 0


def test_select_latents_mean_difference():
    f = torch.tensor([[0.0, 5.0, 1.0, 0.0], [0.0, 4.0, 0.0, 2.0], [1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    y = torch.tensor([1, 1, 0, 0])
    # |mean diff| per column: 1, 4, 0, 1 -> order 1, then 0 and 3 tie (lower index first), then 2
    assert select_latents(f, y, 4).tolist() == [1, 0, 3, 2]


def test_logistic_probe_matches_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    y = (x @ np.array([1.5, -2.0, 0.3]) + rng.normal(scale=1.0, size=200) > 0).astype(np.int64)
    l2 = 1e-2
    probe = fit_logistic(torch.as_tensor(x), torch.as_tensor(y), l2=l2)
    xs = (x - x.mean(0)) / x.std(0)

    def objective(p):
        z = xs @ p[:3] + p[3]
        return np.mean(np.logaddexp(0, z) - y * z) + l2 * np.sum(p[:3] ** 2)

    ref = minimize(objective, np.zeros(4), method="BFGS", options={"gtol": 1e-10})
    assert probe.w.numpy() == pytest.approx(ref.x[:3], abs=1e-5)
    assert float(probe.b) == pytest.approx(ref.x[3], abs=1e-5)


def test_probe_finds_the_planted_latent():
    g = torch.Generator().manual_seed(0)
    n, d, d_sae = 1200, 8, 32
    y = (torch.rand(n, generator=g) < 0.3).long()
    acts = torch.randn(n, d, generator=g)
    acts[:, 0] += 0.4 * y                                  # a weak signal in the raw activations

    def encoder(x):                                        # "SAE": latent 7 carries the label, the rest noise
        h = torch.randn(x.shape[0], d_sae, generator=torch.Generator().manual_seed(1)).relu()
        h[:, 7] = 3.0 * y.double() + 0.1 * torch.rand(x.shape[0], generator=torch.Generator().manual_seed(2))
        return h

    res = probe_all(acts, y, ["negative", "positive"], {"sae": encoder}, one_vs_rest=False, ks=(1, 2),
                    max_per_class=400)
    task = res["tasks"]["positive vs negative"]
    assert res["label_counts"]["positive"] == int(y.sum())
    assert task["saes"]["sae"]["latents"]["1"] == [7]
    assert task["saes"]["sae"]["accuracy"]["1"] == 1.0
    assert 0.5 < task["raw_dense"] < 0.8 and task["raw_topk"]["1"] < 0.8
    assert task["n_train"] + task["n_test"] == 2 * min(int(y.sum()), int((1 - y).sum()), 400)


def test_probe_accuracy_is_chance_without_signal():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2000, 4, generator=g)
    y = (torch.rand(2000, generator=g) < 0.5).long()
    acc = probe_accuracy(x[:1000], y[:1000], x[1000:], y[1000:])
    assert 0.45 < acc < 0.55
