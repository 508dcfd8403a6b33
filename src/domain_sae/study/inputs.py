"""What the study feeds its SAEs and analyses: a general mixture of activation sources, held-out activation sets
and the two prompt sets of the direction analysis."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.segments import USER, training_mask
from ..models.hooks import capture


class MixtureSource:
    """The "general" distribution: every batch is the concatenation of one batch from each part (the parts serve
    equal shares, built by the caller), so the mixture weights are exact at every step, not only on average.

    Same interface as the activation sources (iterator, ``next_batch``, ``first_buffer``, ``state_dict``)."""

    def __init__(self, *parts):
        if len(parts) < 1:
            raise ValueError("MixtureSource needs at least one part.")
        self.parts = list(parts)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        return torch.cat([next(p) for p in self.parts])

    next_batch = __next__

    def first_buffer(self) -> torch.Tensor:
        return torch.cat([p.first_buffer() for p in self.parts])

    def state_dict(self) -> dict:
        return {"parts": [p.state_dict() for p in self.parts]}

    def load_state_dict(self, state: dict) -> None:
        if len(state.get("parts", ())) != len(self.parts):
            raise ValueError(f"Mixture state holds {len(state.get('parts', ()))} parts; this mixture has "
                             f"{len(self.parts)}.")
        for p, st in zip(self.parts, state["parts"]):
            p.load_state_dict(st)


def split_evenly(total: int, n: int) -> list[int]:
    """``total`` split into ``n`` integer shares that differ by at most one (larger shares first)."""
    return [total // n + (1 if i < total % n else 0) for i in range(n)]


@dataclass
class HeldoutActivations:
    """Activations of a held-out token set: ``acts`` [S, T, d], ``ids`` and ``segments`` [S, T], ``mask`` [S, T]
    (positions that count: not padding, not special tokens)."""

    acts: torch.Tensor
    ids: torch.Tensor
    segments: torch.Tensor
    mask: torch.Tensor

    @property
    def flat(self) -> torch.Tensor:
        """[N, d] activations of the counted positions."""
        return self.acts[self.mask]

    @staticmethod
    def concat(*parts: "HeldoutActivations") -> "HeldoutActivations":
        ctx = min(p.ids.shape[1] for p in parts)
        return HeldoutActivations(*(torch.cat([getattr(p, f)[:, :ctx] for p in parts])
                                    for f in ("acts", "ids", "segments", "mask")))


@torch.no_grad()
def heldout_activations(lm, hook, ids: torch.Tensor, segs: torch.Tensor, batch_size: int = 8) -> HeldoutActivations:
    device = lm.device
    acts = torch.cat([capture(lm.model, hook, ids[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(ids), batch_size)])
    return HeldoutActivations(acts, ids, segs, training_mask(segs, True))


# ----------------------------------------------------------------------------------------------------------------
# Prompt sets (direction analysis)

def _read_prompts(path: str, n: int) -> list[str]:
    lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    if not lines:
        from ..config import ConfigError
        raise ConfigError(f"Prompt file {path} holds no prompts (one per line).")
    return lines[:n]


def code_request_prompts(n: int) -> list[str]:
    """Code requests built from standard-library functions: "Write a Python function `name` that <docstring line>"."""
    from ..data.sources import stdlib_files
    out: list[str] = []
    for path in stdlib_files():
        try:
            tree = ast.parse(Path(path).read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                doc = (ast.get_docstring(node) or "").strip().splitlines()
                if doc and 20 <= len(doc[0]) <= 100:
                    out.append(f"Write a Python function `{node.name}` that does this: {doc[0].rstrip('.')}.")
                    break  # one per module keeps the set varied
        if len(out) >= n:
            break
    return out


def small_talk_prompts(n: int, chat_spec: str = "chat") -> list[str]:
    """First user messages of conversations in the chat corpus (short ones)."""
    from ..data.sources import open_source
    out = []
    for doc in open_source(chat_spec):
        if doc.messages:
            first = doc.messages[0]["content"].strip()
            if 15 <= len(first) <= 160:
                out.append(first)
        if len(out) >= n:
            break
    return out


def prompt_sets(cfg) -> tuple[list[str], list[str]]:
    a = _read_prompts(cfg.prompts_a, cfg.n_prompts) if cfg.prompts_a else code_request_prompts(cfg.n_prompts)
    b = (_read_prompts(cfg.prompts_b, cfg.n_prompts) if cfg.prompts_b
         else small_talk_prompts(cfg.n_prompts, cfg.domains.get("chat", "chat")))
    return a, b


@torch.no_grad()
def prompt_activations(lm, hook, prompts: list[str]) -> torch.Tensor:
    """[n, d]: per prompt, the mean activation over the user-content tokens of the chat-rendered prompt."""
    from ..data.formatting import tokenize_document
    from ..data.sources import Document
    rows = []
    for p in prompts:
        ids, segs = tokenize_document(Document(messages=[{"role": "user", "content": p}]), lm.tokenizer)
        ids_t, segs_t = torch.tensor([ids]), torch.tensor(segs)
        a = capture(lm.model, hook, ids_t.to(lm.device))[0].float().cpu()
        keep = segs_t == USER
        rows.append(a[keep].mean(0) if keep.any() else a.mean(0))
    return torch.stack(rows)


def generation_prompt_ids(lm, prompt: str) -> torch.Tensor:
    """Token ids of ``prompt`` as a user turn followed by the assistant header (what the model continues)."""
    tok = lm.tokenizer
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
    else:
        text = f"User: {prompt}\nAssistant:"
    return torch.tensor([tok(text, add_special_tokens=False).input_ids])

