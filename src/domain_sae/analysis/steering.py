"""Steering: add a direction to (or ablate it from) the hook's activation and measure what changes.

A patch is a function ``a -> a'`` on the hook's activation ``a [B, T, d_in]``, applied at every position by
``domain_sae.models.hooks.forward_with_patch``:

- ``add``:    ``a' = a + s * v``            (v = direction, or v/||v|| with ``unit_norm=True``)
- ``ablate``: ``a' = a - s * <a, u> u``     (u = v/||v||; s = 1 removes the component along u entirely)

``s = 0`` is the identity in both modes. Effects are measured as generations (greedy, deterministic) and as the
change in mean next-token cross-entropy (nats) on held-out text, counting the same targets as the evaluation
(source not PAD, target neither PAD (-1) nor SPECIAL (0): :func:`domain_sae.evaluation.lm_positions`), with
the CE computed as in the evaluation. The baselines are the difference-of-means direction
and ``random_direction_like`` (a random direction of equal norm).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from ..data.segments import PAD
from ..evaluation import lm_positions
from ..evaluation.next_token import token_ce
from ..models import as_hook, as_module, forward_with_patch, forward_with_patch_cached, tokenizer_of
from .errors import AnalysisError

PatchFn = Callable[[Tensor], Tensor]


def _forward(model: torch.nn.Module, hook: Any, input_ids: Tensor, patch_fn: Optional[PatchFn],
             attention_mask: Optional[Tensor]) -> Tensor:
    """Logits ``[B, T, V]``: the plain forward when ``patch_fn`` is None, else ``forward_with_patch``."""
    if patch_fn is None:
        with torch.no_grad():
            return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    with torch.no_grad():
        return forward_with_patch(model, hook, input_ids, patch_fn, attention_mask=attention_mask)


def steer_patch(direction: Tensor, strength: float, mode: str = "add", *, unit_norm: bool = False) -> PatchFn:
    """A patch function for ``forward_with_patch`` that steers along ``direction`` at every position.

    ``mode="add"``: ``a + strength * v`` with v = ``direction`` (its own norm: a decoder row or a diff-of-means
    vector) or ``direction / ||direction||`` when ``unit_norm`` (then ``strength`` is in activation-norm units).
    ``mode="ablate"``: ``a - strength * <a, u> u`` with the unit vector u (``unit_norm`` is irrelevant);
    ``strength=1`` projects the direction out, ``0 < strength < 1`` removes part of it.
    The arithmetic is done in float32 (or the activation's dtype if wider) and cast back to the activation's dtype.
    """
    v = torch.as_tensor(direction).detach().flatten().to(torch.float32)
    if mode not in ("add", "ablate"):
        raise AnalysisError(f"mode must be 'add' or 'ablate', got {mode!r}")
    norm = float(v.norm())
    if not norm > 0 and (mode == "ablate" or unit_norm):
        raise AnalysisError(f"cannot {'ablate' if mode == 'ablate' else 'normalise'} a zero direction")
    if mode == "ablate" or unit_norm:
        v = v / norm
    s = float(strength)

    def patch(a: Tensor) -> Tensor:
        if a.shape[-1] != v.shape[0]:
            raise AnalysisError(f"steering direction has {v.shape[0]} components but the hook's activation has "
                                f"width {a.shape[-1]}; use a direction from an SAE trained on this hook")
        work = torch.promote_types(a.dtype, torch.float32)
        x = a.to(work)
        u = v.to(device=a.device, dtype=work)
        if mode == "add":
            out = x + s * u
        else:
            out = x - s * (x @ u)[..., None] * u
        return out.to(a.dtype)

    patch.direction = v  # type: ignore[attr-defined]
    patch.strength = s  # type: ignore[attr-defined]
    patch.mode = mode  # type: ignore[attr-defined]
    return patch


def random_direction_like(direction: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """A direction drawn uniformly on the sphere (normalised standard Gaussian, CPU ``generator``) rescaled to
    ``||direction||``; same shape, dtype and device as ``direction``. The baseline for steering effects."""
    d = torch.as_tensor(direction).detach()
    g = torch.randn(d.shape, generator=generator, dtype=torch.float64)
    g = g / g.norm() * d.to(torch.float64).norm()
    return g.to(dtype=d.dtype if d.is_floating_point() else torch.float32, device=d.device)


def latent_direction(sae: Any, index: int) -> Tensor:
    """Decoder row ``W_dec[index]`` of an SAE (the direction that latent writes), detached."""
    w = sae.W_dec
    if not 0 <= index < w.shape[0]:
        raise AnalysisError(f"latent index {index} is out of range 0..{w.shape[0] - 1}")
    return w[index].detach().clone()


def _as_prompt_ids(prompt: Any, tokenizer: Any) -> Tensor:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise AnalysisError("a text prompt needs a tokenizer: pass a LoadedModel or tokenizer=..., or token ids")
        prompt = tokenizer(prompt, return_tensors="pt")["input_ids"]
    ids = torch.as_tensor(prompt, dtype=torch.long)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise AnalysisError(f"prompt_ids must be one non-empty sequence [T] or [1, T], got shape {tuple(ids.shape)}")
    return ids


def generate_with_patch(lm: Any, hook: Any, prompt_ids: Any, patch_fn: Optional[PatchFn], max_new_tokens: int = 32,
                        greedy: bool = True, *, tokenizer: Any = None, stop_at_eos: bool = True,
                        temperature: float = 1.0, generator: Optional[torch.Generator] = None,
                        return_ids: bool = False, kv_cache: bool = True) -> str | Tensor:
    """Generate ``max_new_tokens`` tokens with the patch applied at every position, prompt included.

    With ``kv_cache`` (default) each step runs only the new token, with the earlier positions' keys and values cached
    (:func:`domain_sae.models.forward_with_patch_cached`): exact for a patch that acts on each position on its own,
    as every mode of :func:`steer_patch` does. ``kv_cache=False`` re-runs the full patched forward on the sequence so
    far at every step (for a patch that depends on the whole sequence). Each step takes the argmax of the last
    position's logits (``greedy``), or samples from
    ``softmax(logits / temperature)`` with ``generator``. ``patch_fn=None`` generates without intervention. Stops
    early at the tokenizer's EOS when ``stop_at_eos``. Returns the decoded new text (special tokens skipped), or the
    new token ids ``[n_new]`` with ``return_ids=True`` (no tokenizer needed then).
    """
    model = as_module(lm)
    tok = tokenizer if tokenizer is not None else tokenizer_of(lm)
    hook = as_hook(model, hook)
    device = next(model.parameters()).device
    ids = _as_prompt_ids(prompt_ids, tok).to(device)
    eos = getattr(tok, "eos_token_id", None) if stop_at_eos else None
    new: list[int] = []
    cache, step_ids = None, ids
    for _ in range(int(max_new_tokens)):
        if kv_cache:
            last, cache = forward_with_patch_cached(model, hook, step_ids, patch_fn or (lambda a: a), cache)
            logits = last[0].to(torch.float32)
        else:
            logits = _forward(model, hook, ids, patch_fn, None)[0, -1].to(torch.float32)
        if greedy:
            nxt = int(torch.argmax(logits))
        else:
            if temperature <= 0:
                raise AnalysisError("temperature must be > 0 for sampling; use greedy=True for argmax decoding")
            probs = torch.softmax(logits / temperature, dim=-1).cpu()
            nxt = int(torch.multinomial(probs, 1, generator=generator))
        new.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
        step_ids = ids if cache is None else ids[:, -1:]  # a model without a cache gets the whole sequence
        if eos is not None and nxt == eos:
            break
    if return_ids:
        return torch.tensor(new, dtype=torch.long)
    if tok is None:
        raise AnalysisError("cannot decode without a tokenizer: pass a LoadedModel, tokenizer=..., or return_ids=True")
    return tok.decode(new, skip_special_tokens=True)


def next_token_ce(lm: Any, hook: Any, input_ids: Tensor, segments: Tensor, patch_fn: Optional[PatchFn] = None, *,
                  batch_size: int = 8) -> tuple[float, int]:
    """``(mean CE in nats, number of counted targets)`` of next-token prediction, with ``patch_fn`` or clean.

    ``CE = -(1/N) sum log softmax(logits[b, t])[input_ids[b, t+1]]`` over the pairs (t, t+1) counted by the
    evaluation's rule: ``segments[t] != PAD`` and ``segments[t+1]`` neither PAD (-1) nor SPECIAL (0) (BOS may
    predict the first token; nothing predicts a special token; :func:`domain_sae.evaluation.lm_positions`). PAD
    positions are masked out of attention. Computed as in the evaluation
    (:func:`domain_sae.evaluation.next_token.token_ce`).
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    segs = torch.as_tensor(segments)
    if ids.ndim == 1:
        ids, segs = ids[None], segs[None]
    if ids.shape != segs.shape or ids.ndim != 2:
        raise AnalysisError(f"input_ids {tuple(ids.shape)} and segments {tuple(segs.shape)} must both be [N, T]")
    if ids.shape[1] < 2:
        raise AnalysisError("sequences need at least 2 tokens to have a next-token target")
    model = as_module(lm)
    hook = as_hook(model, hook)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, ids.shape[0], batch_size):
        x, s = ids[i:i + batch_size], segs[i:i + batch_size]
        mask = s != PAD
        attn = mask.long().to(device) if not bool(mask.all()) else None
        logits = _forward(model, hook, x.to(device), patch_fn, attn)[:, :-1]
        counted = lm_positions(s).to(device)
        if not bool(counted.any()):
            continue
        tgt = x[:, 1:].to(device)[counted]
        total += float(token_ce(logits[counted], tgt).sum())  # as the evaluation (float64 sums and logs)
        count += int(counted.sum())
    if count == 0:
        raise AnalysisError("no countable next-token targets: every target is PAD or SPECIAL; pass held-out text "
                            "with ordinary tokens")
    return total / count, count


def ce_change(lm: Any, hook: Any, input_ids: Tensor, segments: Tensor, patch_fn: PatchFn, *, batch_size: int = 8,
              clean_ce: Optional[float] = None) -> float:
    """``CE(patched) - CE(clean)`` in nats per counted token on the same held-out text (see ``next_token_ce``).
    Positive: the steering made this text less likely. Pass ``clean_ce`` to reuse a clean CE already computed on the
    same tokens."""
    if clean_ce is None:
        clean_ce = next_token_ce(lm, hook, input_ids, segments, None, batch_size=batch_size)[0]
    patched, _ = next_token_ce(lm, hook, input_ids, segments, patch_fn, batch_size=batch_size)
    return patched - clean_ce


def steering_sweep(lm: Any, hook: Any, directions: dict[str, Tensor], strengths: Sequence[float],
                   heldout: dict[str, tuple[Tensor, Tensor]], *, mode: str = "add", unit_norm: bool = False,
                   prompts: Sequence[Any] = (), max_new_tokens: int = 24, batch_size: int = 8,
                   tokenizer: Any = None) -> dict[str, Any]:
    """Steer along each named direction at each strength; JSON-ready results.

    ``heldout`` maps a domain name to ``(input_ids [N, T], segments [N, T])``. Returns ``{"mode", "strengths",
    "clean_ce": {domain: CE}, "ce_change": {direction: {domain: [delta per strength]}}, "generations":
    {"clean": [text per prompt], direction: {str(strength): [text per prompt]}}}``. Generations are greedy, decoded
    with ``tokenizer`` (default ``lm.tokenizer``); prompts are token ids or text.
    """
    def gen(p: Any, patch: Optional[PatchFn]) -> str:
        return generate_with_patch(lm, hook, p, patch, max_new_tokens, tokenizer=tokenizer)  # type: ignore[return-value]

    clean = {dom: next_token_ce(lm, hook, ids, segs, None, batch_size=batch_size)[0]
             for dom, (ids, segs) in heldout.items()}
    out: dict[str, Any] = {"mode": mode, "unit_norm": unit_norm, "strengths": [float(s) for s in strengths],
                           "clean_ce": clean, "ce_change": {}, "generations": {}}
    if prompts:
        out["generations"]["clean"] = [gen(p, None) for p in prompts]
    for name, direction in directions.items():
        out["ce_change"][name] = {dom: [] for dom in heldout}
        gens: dict[str, list[str]] = {}
        for s in strengths:
            patch = steer_patch(direction, s, mode, unit_norm=unit_norm)
            for dom, (ids, segs) in heldout.items():
                out["ce_change"][name][dom].append(
                    ce_change(lm, hook, ids, segs, patch, batch_size=batch_size, clean_ce=clean[dom]))
            if prompts:
                gens[str(float(s))] = [gen(p, patch) for p in prompts]
        if prompts:
            out["generations"][name] = gens
    return out
