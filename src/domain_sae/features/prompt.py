"""Per-token metrics of one prompt for one SAE (the dashboard's prompt page).

For token t (predicting token t+1), latent i with activation f_i(t):

1. **activation** f_i(t);
2. **quantile** of f_i(t) within the latent's own distribution of active values (linear interpolation in the
   store's 101-percentile table; 0 = its smallest active value seen, 1 = its largest);
3. **direct logit effect** on the actual next token y = ids[t+1]: f_i(t) * W_U[y] . (g * P d_i) / s(t), the direct
   path through the final norm with its scale s(t) frozen at this token's value (see :mod:`.directions`);
4. **ablation loss change**: CE_t(a - f_i d_i) - CE_t(a), the exact change of the next-token cross-entropy when the
   latent's decoder contribution f_i(s) d_i is removed from the hook activation a at every position s (the SAE's
   error term stays, so only that latent changes). One full forward per latent, batched; computed for the
   candidate latents: the union over tokens of each token's top latents by metrics 1-3, at most
   ``max_candidates`` of them (those with the best rank in any token's lists first, ties by activation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data.formatting import tokenize_document
from ..data.sources import DataError, Document
from ..errors import UserError
from ..models.hooks import forward_with_patch, resolve_hook
from .detok import token_texts
from .logit_effects import find_unembedding

MAX_PROMPT_CHARS = 4000
MAX_PROMPT_TOKENS = 256


class PromptError(UserError):
    """A prompt that cannot be analysed (empty, too long, wrong type)."""


def tokenize_prompt(tokenizer, text: Any = None, messages: Any = None, *, prepend_bos: bool = True
                    ) -> tuple[list[int], list[int]]:
    """Token ids and segment codes of a plain prompt or a chat exchange (rendered with the chat template)."""
    if (text is None) == (messages is None):
        raise PromptError("Give exactly one of 'text' (a string) or 'messages' (a list of {role, content}).")
    if text is not None:
        if not isinstance(text, str):
            raise PromptError(f"'text' must be a string (got {type(text).__name__}).")
        if not text.strip():
            raise PromptError("The prompt is empty; type some text.")
        if len(text) > MAX_PROMPT_CHARS:
            raise PromptError(f"The prompt has {len(text)} characters; the limit is {MAX_PROMPT_CHARS}.")
        doc = Document(text=text)
    else:
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise PromptError("'messages' must be a non-empty list of {\"role\": str, \"content\": str}.")
        if sum(len(m["content"]) for m in messages) > MAX_PROMPT_CHARS:
            raise PromptError(f"The messages hold more than {MAX_PROMPT_CHARS} characters.")
        doc = Document(messages=[{"role": m["role"], "content": m["content"]} for m in messages])
    try:
        ids, segs = tokenize_document(doc, tokenizer, prepend_bos)
    except DataError as e:
        raise PromptError(str(e)) from None
    if len(ids) > MAX_PROMPT_TOKENS:
        raise PromptError(f"The prompt is {len(ids)} tokens long; the limit is {MAX_PROMPT_TOKENS}.")
    if len(ids) < 2:
        raise PromptError("The prompt needs at least two tokens (a token and the one it predicts).")
    return ids, segs


def quantiles(values: torch.Tensor, latents: torch.Tensor, table: np.ndarray) -> torch.Tensor:
    """Quantile in [0, 1] of ``values[n]`` within latent ``latents[n]``'s percentile table (NaN when it has none)."""
    t = torch.as_tensor(table[latents.numpy()], dtype=torch.float32)   # [n, 101]
    if t.numel() == 0:
        return torch.zeros(0)
    grid = torch.linspace(0, 1, t.shape[1])
    idx = torch.searchsorted(t.contiguous(), values[:, None].contiguous()).squeeze(1).clamp(1, t.shape[1] - 1)
    lo, hi = t.gather(1, (idx - 1)[:, None]).squeeze(1), t.gather(1, idx[:, None]).squeeze(1)
    frac = torch.where(hi > lo, (values - lo) / (hi - lo).clamp_min(1e-12), torch.ones_like(values))
    q = (grid[idx - 1] + frac.clamp(0, 1) * (grid[idx] - grid[idx - 1]))
    q = torch.where(values >= t[:, -1], torch.ones_like(q), q)
    q = torch.where(values <= t[:, 0], torch.zeros_like(q), q)
    return torch.where(torch.isnan(t[:, 0]), torch.full_like(q, float("nan")), q)


@dataclass
class PromptState:
    """What the ablation step needs from the first analysis."""
    ids: torch.Tensor            # [1, T]
    f: torch.Tensor              # [T, d_sae]
    ce: torch.Tensor             # [T-1] clean next-token CE
    candidates: list[int] = field(default_factory=list)


def _next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[B, T-1] cross-entropy of token t+1 given positions <= t."""
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:].expand(logits.shape[0], -1),
                           reduction="none")


@torch.no_grad()
def analyse_prompt(lm: Any, sae: Any, hook: str, ids: list[int], segs: list[int], table: np.ndarray, *,
                   top_n: int = 8, max_candidates: int = 128) -> tuple[dict, PromptState]:
    """Metrics 1-3 for every token (module docstring) and the ablation candidates. Returns the JSON-ready
    result and the state :func:`ablation_effects` continues from."""
    model = lm.model
    hp = resolve_hook(model, hook)
    x = torch.tensor([ids], device=lm.device)
    un = find_unembedding(model)
    grabbed: dict[str, torch.Tensor] = {}
    handles = []
    if un is not None and un.norm is not None:
        handles.append(un.norm.register_forward_pre_hook(lambda m, a: grabbed.__setitem__("h", a[0].detach())))

    def keep(a: torch.Tensor) -> torch.Tensor:
        grabbed["a"] = a.detach().clone()
        return a
    try:
        logits = forward_with_patch(model, hp, x, keep)
    finally:
        for h in handles:
            h.remove()
    a = grabbed["a"][0].to(sae.dtype)
    f = sae.encode(a).float().cpu()                                     # [T, d]
    ce = _next_token_ce(logits, x)[0].cpu()
    T = len(ids)
    dla = torch.zeros(T, sae.d_sae)
    if un is not None and un.W_U.shape[1] == sae.d_in:
        rows = un.W_U[torch.tensor(ids[1:])] * un.gain                     # (g * P d).w = d.P(g * w), P symmetric
        rows = rows - rows.mean(-1, keepdim=True) if un.centre else rows
        per_unit = rows @ sae.W_dec.detach().float().cpu().T               # [T-1, d]
        scale = un.scale(grabbed["h"][0].cpu()) if "h" in grabbed else torch.ones(T)
        dla[:-1] = f[:-1] * per_unit / scale[:-1, None]
    active = torch.nonzero(f > 0)
    q = torch.full_like(f, float("nan"))
    if active.numel():
        q[active[:, 0], active[:, 1]] = quantiles(f[active[:, 0], active[:, 1]], active[:, 1].cpu(), table)
    texts = token_texts(lm.tokenizer, ids)
    tokens, best = [], {}
    for t in range(T):
        act = torch.nonzero(f[t] > 0).flatten()

        def ranked(score: torch.Tensor, key=None, act=act) -> list[dict]:
            if act.numel() == 0:
                return []
            s = score[act] if key is None else key(score[act])
            s = torch.nan_to_num(s, nan=-1.0)
            order = torch.argsort(-s, stable=True)[:top_n]
            return [{"latent": int(act[o]), "value": float(score[act[o]])} for o in order]
        entry = {"i": t, "id": int(ids[t]), "text": texts[t], "segment": int(segs[t]),
                 "next_ce": float(ce[t]) if t < T - 1 else None,
                 "activation": ranked(f[t]), "quantile": ranked(q[t]),
                 "logit": ranked(dla[t], key=torch.abs) if t < T - 1 else [], "ablation": None}
        for m in ("activation", "quantile", "logit"):
            for rank, e in enumerate(entry[m]):
                key = (rank, -float(f[t, e["latent"]]))
                best[e["latent"]] = min(best.get(e["latent"], key), key)
        tokens.append(entry)
    labels = {"activation": "activation f_i(t)", "quantile": "quantile within the latent's active values",
              "logit": "direct logit effect on the actual next token (direct path)",
              "ablation": "loss change on the next token when the latent is ablated (nats)"}
    cands = sorted(sorted(best, key=lambda k: best[k])[:max_candidates])
    return ({"tokens": tokens, "n_tokens": T, "metrics": labels, "candidates": cands},
            PromptState(x.cpu(), f, ce, cands))


@torch.no_grad()
def ablation_effects(lm: Any, sae: Any, hook: str, state: PromptState, *, batch_size: int = 16,
                     progress: Callable[[int, int], None] | None = None) -> dict[int, torch.Tensor]:
    """``{latent: delta [T-1]}`` with delta_t = CE_t(a - f_i d_i) - CE_t(a) for every candidate latent; one batched
    forward per ``batch_size`` latents; ``progress(done, total)`` after each."""
    model = lm.model
    hp = resolve_hook(model, hook)
    W = sae.W_dec.detach()
    out: dict[int, torch.Tensor] = {}
    cands = list(state.candidates)
    for s in range(0, len(cands), batch_size):
        lat = torch.tensor(cands[s:s + batch_size])
        contrib = state.f[:, lat].T.to(W.device, W.dtype)[:, :, None] * W[lat][:, None, :]   # [B, T, d_in]

        def patch(a: torch.Tensor, contrib=contrib) -> torch.Tensor:
            return a - contrib.to(a.dtype)
        ids = state.ids.to(lm.device).expand(len(lat), -1)
        logits = forward_with_patch(model, hp, ids, patch)
        ce = _next_token_ce(logits, ids).cpu()
        for b, latent in enumerate(lat.tolist()):
            out[latent] = ce[b] - state.ce
        if progress:
            progress(min(s + batch_size, len(cands)), len(cands))
    return out


def rank_ablation(effects: dict[int, torch.Tensor], state: PromptState, top_n: int = 8) -> list[list[dict]]:
    """Per token t < T-1: the candidates with the largest |delta_t| (those active at some position <= t)."""
    T = state.ids.shape[1]
    if not effects:
        return [[] for _ in range(T)]
    lats = list(effects)
    mat = torch.stack([effects[latent] for latent in lats])          # [L, T-1]
    out = []
    for t in range(T - 1):
        col = mat[:, t]
        order = torch.argsort(-col.abs(), stable=True)[:top_n]
        out.append([{"latent": lats[o], "value": float(col[o])} for o in order if float(col[o]) != 0.0])
    out.append([])
    return out
