"""k-sparse probing on labels available offline: Python token types (code) and user vs assistant turns (chat).

Labels
    Code: the standard library's :mod:`tokenize` labels every character of a Python source with the type of the
    Python token it belongs to: ``NAME`` (identifiers), ``KEYWORD`` (``keyword.iskeyword``; soft keywords such as
    ``match`` stay NAME), ``OP``, ``STRING`` (including f-string parts), ``COMMENT``, ``NUMBER``; other characters
    (whitespace, newlines, indentation) have none. An LM token spanning characters ``[s, e)`` (the tokenizer's offset
    mapping) gets the type held by most of its labelled characters (ties: the first type in :data:`PY_TOKEN_TYPES`);
    a token with no labelled character (pure whitespace) gets none. A source that ``tokenize`` rejects part-way keeps
    the labels it had reached. Chat: the segment codes of :mod:`domain_sae.data.segments` (``USER`` vs
    ``ASSISTANT``; template, special and system tokens are not used).

Tasks
    One binary task per class (token type vs the other labelled tokens; assistant vs user). Each task is balanced:
    ``n = min(#positives, #negatives, max_per_class)`` examples of each class drawn without replacement by a fixed
    generator, then split ``test_fraction`` / rest into test and train, so chance accuracy is 0.5.

Probes
    Latent choice on the TRAIN split only: score_i = |mean_{y=1} f_i - mean_{y=0} f_i| (the mean-difference /
    class-separation score), the k largest (ties: lower index). Logistic regression on the k chosen latents,
    standardised with train mean and std: minimise mean_t BCE(sigmoid(x_t w + b), y_t) + l2 ||w||^2 (float64, L-BFGS
    with strong Wolfe line search). Accuracy = fraction of test examples with (p >= 0.5) == y. Baselines on the raw
    activations x: the dense probe on all d_in dimensions, and the k-sparse probe on the k raw dimensions with the
    largest score (the same selection rule on neurons instead of latents).
"""

from __future__ import annotations

import io
import keyword
import tokenize
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from ..data.segments import ASSISTANT, USER

__all__ = ["PY_TOKEN_TYPES", "CHAT_ROLES", "python_char_types", "label_tokens_by_chars", "code_probe_tokens",
           "chat_turn_labels", "balanced_split", "select_latents", "LogisticProbe", "fit_logistic",
           "probe_accuracy", "probe_task", "probe_all"]

PY_TOKEN_TYPES = ("NAME", "KEYWORD", "OP", "STRING", "COMMENT", "NUMBER")
CHAT_ROLES = ("user", "assistant")
_STRING_TYPES = {tokenize.STRING} | {getattr(tokenize, n) for n in ("FSTRING_START", "FSTRING_MIDDLE",
                                                                      "FSTRING_END") if hasattr(tokenize, n)}
_TYPE_OF = {tokenize.OP: 2, tokenize.COMMENT: 4, tokenize.NUMBER: 5, **{t: 3 for t in _STRING_TYPES}}


# ----------------------------------------------------------------------------------------------------------------
# Labels

def python_char_types(source: str) -> np.ndarray:
    """int8 [len(source)]: the index in :data:`PY_TOKEN_TYPES` of each character's Python token, -1 for none."""
    out = np.full(len(source), -1, dtype=np.int8)
    lines = io.StringIO(source).readlines()
    starts = np.concatenate([[0], np.cumsum([len(line) for line in lines])]).astype(np.int64)
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.NAME:
                code = 1 if keyword.iskeyword(tok.string) else 0
            else:
                code = _TYPE_OF.get(tok.type, -1)
            if code < 0:
                continue
            (r0, c0), (r1, c1) = tok.start, tok.end
            if r0 - 1 >= len(starts) or r1 - 1 >= len(starts):
                continue
            s, e = int(starts[r0 - 1] + c0), int(starts[r1 - 1] + c1)
            out[s:e] = code
    except (tokenize.TokenError, SyntaxError):  # IndentationError is a SyntaxError; keep what was labelled
        pass
    return out


def label_tokens_by_chars(offsets: Sequence[Sequence[int]], char_labels: np.ndarray, n_classes: int) -> np.ndarray:
    """int64 [n_tokens]: per token span ``[s, e)``, the label held by most of its labelled characters (ties: the
    lower label), -1 when none of its characters is labelled."""
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    counts = np.zeros((len(off), n_classes), dtype=np.int64)
    for c in range(n_classes):
        csum = np.concatenate([[0], np.cumsum(char_labels == c)])
        counts[:, c] = csum[np.clip(off[:, 1], 0, len(char_labels))] - csum[np.clip(off[:, 0], 0, len(char_labels))]
    best = counts.argmax(axis=1)
    return np.where(counts.max(axis=1) > 0, best, -1)


def _spread(n: int, k: Optional[int]) -> list[int]:
    """``k`` of ``range(n)`` evenly spread (all when k is None or >= n; the middle one when k == 1)."""
    if k is None or k >= n:
        return list(range(n))
    if k == 1:
        return [n // 2]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def code_probe_tokens(texts: Sequence[str], tokenizer, context_size: int, *, max_tokens: int,
                      bos_id: Optional[int] = None, pad_id: int = 0, windows_per_document: Optional[int] = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Python sources -> ``(input_ids [N, context_size], labels [N, context_size])`` for the token-type probes.

    Each source is tokenized alone (no special tokens, with offsets), labelled by :func:`label_tokens_by_chars`
    over :func:`python_char_types`, and cut into windows of ``context_size - 1`` tokens, each preceded by
    ``bos_id`` (label -1; no BOS when None: windows of ``context_size``); the last window is padded with ``pad_id``
    (label -1). ``windows_per_document`` keeps only that many windows of each source, evenly spread (one: the
    middle window), so that a probing set spans many files instead of the first file's docstring. Stops once
    ``max_tokens`` labelled tokens are collected."""
    width = context_size - (1 if bos_id is not None else 0)
    rows_ids, rows_lab, n_labelled = [], [], 0
    for text in texts:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        labels = label_tokens_by_chars(enc["offset_mapping"], python_char_types(text), len(PY_TOKEN_TYPES))
        starts = list(range(0, len(ids), width))
        for s in (starts[i] for i in _spread(len(starts), windows_per_document)):
            chunk_ids, chunk_lab = ids[s:s + width], labels[s:s + width]
            pad = width - len(chunk_ids)
            chunk_ids = np.concatenate([chunk_ids, np.full(pad, pad_id, dtype=np.int64)])
            chunk_lab = np.concatenate([chunk_lab, np.full(pad, -1, dtype=np.int64)])
            if bos_id is not None:
                chunk_ids = np.concatenate([[bos_id], chunk_ids])
                chunk_lab = np.concatenate([[-1], chunk_lab])
            rows_ids.append(chunk_ids)
            rows_lab.append(chunk_lab)
            n_labelled += int((chunk_lab >= 0).sum())
            if n_labelled >= max_tokens:
                return torch.as_tensor(np.stack(rows_ids)), torch.as_tensor(np.stack(rows_lab))
    if not rows_ids:
        raise ValueError("code_probe_tokens got no source text to label.")
    return torch.as_tensor(np.stack(rows_ids)), torch.as_tensor(np.stack(rows_lab))


def chat_turn_labels(segments: torch.Tensor) -> torch.Tensor:
    """int64, same shape: 0 for user-content tokens, 1 for assistant-content tokens, -1 for every other token."""
    out = torch.full(segments.shape, -1, dtype=torch.long)
    out[segments == USER] = 0
    out[segments == ASSISTANT] = 1
    return out


# ----------------------------------------------------------------------------------------------------------------
# Probes

def balanced_split(y: np.ndarray, *, max_per_class: int, test_fraction: float, seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices of a balanced binary task (module docstring); both empty when a class is missing."""
    rng = np.random.default_rng(seed)
    pos, neg = np.nonzero(y == 1)[0], np.nonzero(y == 0)[0]
    n = min(len(pos), len(neg), max_per_class)
    if n < 2:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    pos, neg = rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)
    n_test = max(1, int(round(n * test_fraction)))
    test = np.concatenate([pos[:n_test], neg[:n_test]])
    train = np.concatenate([pos[n_test:], neg[n_test:]])
    return rng.permutation(train), rng.permutation(test)


def select_latents(features: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` columns with the largest |mean over y=1 - mean over y=0| (ties: lower index)."""
    f = features.double()
    yb = y.bool()
    score = (f[yb].mean(0) - f[~yb].mean(0)).abs()
    score = torch.nan_to_num(score, nan=0.0)
    order = torch.sort(-score, stable=True).indices
    return order[:k]


@dataclass
class LogisticProbe:
    """Standardised logistic regression: p = sigmoid(((x - mean) / std) w + b)."""

    w: torch.Tensor
    b: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        z = ((x.double() - self.mean) / self.std) @ self.w + self.b
        return torch.sigmoid(z)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, *, l2: float = 1e-3, max_iter: int = 200) -> LogisticProbe:
    """Minimise mean BCE + l2 ||w||^2 on standardised features (std 0 -> 1) with L-BFGS in float64."""
    x = x.double()
    yf = y.double()
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    xs = (x - mean) / std
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, yf) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LogisticProbe(w.detach(), b.detach(), mean, std)


def probe_accuracy(x_train, y_train, x_test, y_test, **kw) -> float:
    """Test accuracy of :func:`fit_logistic` trained on the train split."""
    probe = fit_logistic(x_train, y_train, **kw)
    return float(((probe.predict_proba(x_test) >= 0.5).long() == y_test.long()).double().mean())


def probe_task(acts: torch.Tensor, y: torch.Tensor, encoders: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
               *, ks: Sequence[int] = (1, 2, 5, 20), max_per_class: int = 2000, test_fraction: float = 0.3,
               seed: int = 0) -> dict:
    """One balanced binary task: k-sparse probes on each encoder's latents, and on the raw activations (dense and
    k-sparse on neurons). ``acts`` [N, d_in] and ``y`` [N] in {0, 1}. Returns a JSON-ready dict."""
    train, test = balanced_split(y.numpy(), max_per_class=max_per_class, test_fraction=test_fraction, seed=seed)
    out: dict = {"n_train": int(len(train)), "n_test": int(len(test)), "ks": list(ks), "saes": {}}
    if len(train) < 2 or len(test) < 2:
        out["skipped"] = "too few examples of one class"
        return out
    tr, te = torch.as_tensor(train), torch.as_tensor(test)
    x = acts.double()
    out["raw_dense"] = probe_accuracy(x[tr], y[tr], x[te], y[te])
    out["raw_topk"] = {}
    for k in ks:
        sel = select_latents(x[tr], y[tr], min(k, x.shape[1]))
        out["raw_topk"][str(k)] = probe_accuracy(x[tr][:, sel], y[tr], x[te][:, sel], y[te])
    for name, encode in encoders.items():
        with torch.no_grad():
            f = encode(acts).double()
        res = {"accuracy": {}, "latents": {}}
        for k in ks:
            sel = select_latents(f[tr], y[tr], min(k, f.shape[1]))
            res["accuracy"][str(k)] = probe_accuracy(f[tr][:, sel], y[tr], f[te][:, sel], y[te])
            res["latents"][str(k)] = sel.tolist()
        out["saes"][name] = res
    return out


def probe_all(acts: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
              encoders: Mapping[str, Callable[[torch.Tensor], torch.Tensor]], *, one_vs_rest: bool = True,
              **kw) -> dict:
    """Every task of a labelled set: ``labels`` [N] in {-1, 0..C-1} (-1 unused). With ``one_vs_rest`` one task per
    class (class c vs the other labelled tokens); else the binary task label 1 vs label 0 (C must be 2), named after
    class 1. Returns ``{task: probe_task(...)}`` plus the label counts."""
    keep = labels >= 0
    x, lab = acts[keep], labels[keep]
    counts = {name: int((lab == c).sum()) for c, name in enumerate(class_names)}
    tasks: dict = {}
    if one_vs_rest:
        for c, name in enumerate(class_names):
            tasks[name] = probe_task(x, (lab == c).long(), encoders, **kw)
    else:
        if len(class_names) != 2:
            raise ValueError("A binary probing task needs exactly two class names.")
        tasks[f"{class_names[1]} vs {class_names[0]}"] = probe_task(x, lab.long(), encoders, **kw)
    return {"label_counts": counts, "tasks": tasks}
