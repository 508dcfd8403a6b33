"""What the study feeds its SAEs and analyses: held-out activation sets (and their general mix) and the two prompt
sets of the direction analysis. The general training mixture is :class:`domain_sae.activations.MixtureSource`."""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError
from ..data.formatting import tokenize_document
from ..data.segments import USER, training_mask
from ..data.sources import Document, open_source, stdlib_files
from ..models.hooks import capture


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


def _head(n_rows: int, n_parts: int) -> int:
    """Rows each of ``n_parts`` parts contributes to a mix: the first 1/n_parts (at least one)."""
    return max(1, math.ceil(n_rows / n_parts))


def mix_heldout(parts: list[HeldoutActivations]) -> HeldoutActivations:
    """The general held-out set: the first 1/n of every domain's sequences (about the size of one domain's set)."""
    n = len(parts)
    return HeldoutActivations.concat(*(
        HeldoutActivations(*(getattr(p, f)[:_head(len(p.ids), n)] for f in ("acts", "ids", "segments", "mask")))
        for p in parts))


def mix_tokens(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The general held-out token set: the first 1/n of every domain's (ids, segments) sequences."""
    n = len(parts)
    ids = torch.cat([p[0][:_head(len(p[0]), n)] for p in parts])
    segs = torch.cat([p[1][:_head(len(p[1]), n)] for p in parts])
    return ids, segs


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
        raise ConfigError(f"Prompt file {path} holds no prompts (one per line).")
    return lines[:n]


def code_request_prompts(n: int) -> list[str]:
    """Code requests built from standard-library functions: "Write a Python function `name` that <docstring line>"."""
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

