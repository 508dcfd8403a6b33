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

The live test of one latent (:func:`latent_trace`) gives metrics 1 and 2 of that latent on every token. Request
fields are checked by :func:`check_prompt_input` without a tokenizer, so a bad request is refused before any model
is loaded; chat roles are those of :data:`ROLES`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data.formatting import tokenize_document
from ..data.sources import DataError, Document
from ..errors import UserError
from ..models.hooks import capture, forward_with_patch, resolve_hook
from .detok import token_texts
from .logit_effects import find_unembedding

MAX_PROMPT_CHARS = 4000
MAX_PROMPT_TOKENS = 256
ROLES = ("user", "assistant", "system")


class PromptError(UserError):
    """A prompt that cannot be analysed (empty, too long, wrong type)."""


def check_prompt_input(text: Any = None, messages: Any = None) -> None:
    """Refuse a prompt that cannot be analysed, without a tokenizer: exactly one of ``text`` (a non-empty string of
    at most :data:`MAX_PROMPT_CHARS` characters) or ``messages`` (a non-empty list of ``{"role", "content"}`` with
    string contents, roles from :data:`ROLES`, at most :data:`MAX_PROMPT_CHARS` characters in all)."""
    if (text is None) == (messages is None):
        raise PromptError("Give exactly one of 'text' (a string) or 'messages' (a list of {role, content}).")
    if text is not None:
        if not isinstance(text, str):
            raise PromptError(f"'text' must be a string (got {type(text).__name__}).")
        if not text.strip():
            raise PromptError("The prompt is empty; type some text.")
        if len(text) > MAX_PROMPT_CHARS:
            raise PromptError(f"The prompt has {len(text)} characters; the limit is {MAX_PROMPT_CHARS}.")
        return
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise PromptError("'messages' must be a non-empty list of {\"role\": str, \"content\": str}.")
    for k, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise PromptError(f"Message {k + 1} has role {m['role'][:40]!r}; the roles are {', '.join(ROLES)}.")
        extra = set(m) - {"role", "content"}
        if extra:
            raise PromptError(f"Message {k + 1} has field(s) {', '.join(sorted(map(str, extra)))[:80]}; a message "
                              f"holds only role and content.")
    if sum(len(m["content"]) for m in messages) > MAX_PROMPT_CHARS:
        raise PromptError(f"The messages hold more than {MAX_PROMPT_CHARS} characters.")
    if not any(m["content"].strip() for m in messages):
        raise PromptError("Every message is empty; type some text.")


def tokenize_prompt(tokenizer, text: Any = None, messages: Any = None, *, prepend_bos: bool = True
                    ) -> tuple[list[int], list[int]]:
    """Token ids and segment codes of a plain prompt or a chat exchange (rendered with the chat template), checked
    by :func:`check_prompt_input` and limited to :data:`MAX_PROMPT_TOKENS` tokens."""
    check_prompt_input(text, messages)
    doc = Document(text=text) if text is not None else \
        Document(messages=[{"role": m["role"], "content": m["content"]} for m in messages])
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


def sae_codes(sae: Any, a: torch.Tensor) -> torch.Tensor:
    """The SAE's own latent activations f = sae.encode(a) of hook activations ``a`` [T, d_in], float32 on the CPU
    (TopK keeps its k, JumpReLU gates by its threshold): what every metric of this module reads."""
    return sae.encode(a.to(sae.dtype)).float().cpu()


@torch.no_grad()
def latent_trace(lm: Any, sae: Any, hook: str, ids: list[int], segs: list[int], latent: int,
                 table: np.ndarray) -> dict:
    """The live test of one latent: on every token t its activation f_latent(t) (:func:`sae_codes` of the hook
    activation, the forward stopped at the hook) and, where active, its quantile within the latent's stored
    active values (:func:`quantiles`; None where f = 0 or the latent never fired in the store)."""
    a = capture(lm.model, resolve_hook(lm.model, hook), torch.tensor([ids], device=lm.device))[0]
    f = sae_codes(sae, a)[:, int(latent)]
    q = quantiles(f, torch.full_like(f, int(latent), dtype=torch.long), table)
    texts = token_texts(lm.tokenizer, ids)
    return {"latent": int(latent), "n_tokens": len(ids),
            "tokens": [{"i": t, "id": int(ids[t]), "text": texts[t], "segment": int(segs[t]),
                        "activation": float(f[t]), "quantile": float(q[t]) if f[t] > 0 and not torch.isnan(q[t])
                        else None} for t in range(len(ids))]}


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
    f = sae_codes(sae, grabbed["a"][0])                                  # [T, d]
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
def ablation_batches(lm: Any, sae: Any, hook: str, state: PromptState, out: dict[int, torch.Tensor], *,
                     batch_size: int = 16) -> Iterator[tuple[int, int]]:
    """The ablation one batch at a time: each step runs one batched forward of ``batch_size`` candidate latents,
    puts ``{latent: delta [T-1]}`` with delta_t = CE_t(a - f_i d_i) - CE_t(a) into ``out`` and yields
    ``(done, total)``, so a caller can stop between batches."""
    model = lm.model
    hp = resolve_hook(model, hook)
    W = sae.W_dec.detach()
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
        yield min(s + batch_size, len(cands)), len(cands)


def ablation_effects(lm: Any, sae: Any, hook: str, state: PromptState, *, batch_size: int = 16,
                     progress: Callable[[int, int], None] | None = None) -> dict[int, torch.Tensor]:
    """``{latent: delta [T-1]}`` for every candidate latent (:func:`ablation_batches` run to the end);
    ``progress(done, total)`` after each batch."""
    out: dict[int, torch.Tensor] = {}
    for done, total in ablation_batches(lm, sae, hook, state, out, batch_size=batch_size):
        if progress:
            progress(done, total)
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
