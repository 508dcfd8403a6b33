"""Steering with one latent of an SAE (the dashboard's steering panels).

At every position of the SAE's hook (the prompt's tokens and each generated one), with d_i = W_dec[i] the
latent's decoder row and its unit u = the latent's stored max activation (``max_act`` of the feature store, over
all its datasets), at strength s (in units of u):

- ``add``:   a' = a + (s u) d_i                      (:func:`~domain_sae.analysis.steering.steer_patch`)
- ``clamp``: a' = a + (s u - f_i(a)) d_i             with f_i(a) the SAE's own activation of latent i at that
  position (:func:`.prompt.sae_codes`): the SAE's reconstruction with latent i set to s u, its error term and every
  other latent left as they are (s = 0 ablates the latent, as the prompt page's ablation column does).

The prompt to continue is the text, or a chat exchange as the prompt page renders it (:func:`continuation_prompt`):
one ending with a user or system message gets the chat template's generation prompt (the assistant's header), one
ending with an assistant message is continued (its end-of-turn tokens dropped).

Reported: the greedy continuation of the prompt without and with the intervention (``max_new_tokens`` each,
KV-cached: :func:`~domain_sae.analysis.steering.generate_with_patch`, exact here because both patches act on each
position on its own), and the mean next-token cross-entropy on the prompt, clean and steered, and their difference
(:func:`~domain_sae.analysis.steering.next_token_ce`: the evaluation's counted targets, i.e. no special token is a
target). Work per request is bounded: at most :data:`MAX_NEW_TOKENS` tokens per continuation and
``|s| <=`` :data:`MAX_STRENGTH`. ``check()`` is called at every forward step (it raises to cancel).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..analysis.steering import generate_with_patch, latent_direction, next_token_ce, steer_patch
from ..data.formatting import special_token_ids
from ..data.segments import SPECIAL, TEMPLATE
from ..models.hooks import resolve_hook
from .detok import token_texts
from .prompt import PromptError, sae_codes

MODES = ("add", "clamp")
MAX_NEW_TOKENS = 64
MAX_STRENGTH = 10.0

PatchFn = Callable[[torch.Tensor], torch.Tensor]


def clamp_patch(sae: Any, latent: int, value: float) -> PatchFn:
    """``a -> a + (value - f_latent(a)) d_latent`` at every position (module docstring), in float32."""
    d = latent_direction(sae, latent).float()

    def patch(a: torch.Tensor) -> torch.Tensor:
        flat = a.reshape(-1, a.shape[-1])
        f = sae_codes(sae, flat)[:, latent].to(a.device)
        out = flat.float() + (float(value) - f)[:, None] * d.to(a.device)
        return out.reshape(a.shape).to(a.dtype)
    return patch


def latent_patch(sae: Any, latent: int, mode: str, strength: float, unit: float) -> PatchFn:
    """The intervention of ``mode`` at ``strength`` units of ``unit`` (module docstring)."""
    if mode not in MODES:
        raise PromptError(f"mode must be one of {', '.join(MODES)} (got {mode!r}).")
    if not abs(float(strength)) <= MAX_STRENGTH:
        raise PromptError(f"strength must be between -{MAX_STRENGTH:g} and {MAX_STRENGTH:g} (got {strength}).")
    value = float(strength) * float(unit)
    if mode == "add":
        return steer_patch(latent_direction(sae, latent), value, "add")
    return clamp_patch(sae, latent, value)


def continuation_prompt(tokenizer, ids: list[int], segs: list[int], messages: list[dict] | None
                        ) -> tuple[list[int], list[int]]:
    """The tokens to continue (module docstring): ``ids``/``segs`` of the tokenized prompt, with a chat exchange's
    generation prompt appended (its tokens labelled SPECIAL or TEMPLATE) or its trailing end-of-turn dropped."""
    if not messages:
        return ids, segs
    if messages[-1]["role"] == "assistant":
        n = len(ids)
        while n > 1 and segs[n - 1] in (SPECIAL, TEMPLATE):
            n -= 1
        return ids[:n], segs[:n]
    if not getattr(tokenizer, "chat_template", None):
        return ids, segs
    plain = tokenizer.apply_chat_template(messages, tokenize=False)
    full = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not full.startswith(plain) or len(full) == len(plain):
        return ids, segs
    extra = tokenizer(full[len(plain):], add_special_tokens=False)["input_ids"]
    special = special_token_ids(tokenizer)
    return ids + list(extra), segs + [SPECIAL if t in special else TEMPLATE for t in extra]


def _checked(patch: PatchFn | None, check: Callable[[], None] | None, tick: Callable[[], None] | None) -> PatchFn:
    def run(a: torch.Tensor) -> torch.Tensor:
        if check is not None:
            check()
        out = a if patch is None else patch(a)
        if tick is not None:
            tick()
        return out
    return run


def steer_steps(lm: Any, sae: Any, hook: str, ids: list[int], segs: list[int], latent: int, *, mode: str,
                strength: float, unit: float, max_new_tokens: int = 24, check: Callable[[], None] | None = None,
                tick: Callable[[], None] | None = None) -> Iterator[None]:
    """The steering request in three steps (loss on the prompt, clean continuation, steered continuation): a
    generator that yields after each and returns the JSON-ready result. ``tick()`` after every forward step
    (progress), ``check()`` before it (cancellation)."""
    if not 1 <= int(max_new_tokens) <= MAX_NEW_TOKENS:
        raise PromptError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS} (got {max_new_tokens}).")
    if not unit > 0:
        raise PromptError(f"Latent {latent} never fired on the store's tokens, so it has no typical activation to "
                          f"scale the strength by.")
    model = lm.model
    hp = resolve_hook(model, hook)
    patch = latent_patch(sae, latent, mode, strength, unit)
    x, s = torch.tensor([ids]), torch.tensor([segs])
    with torch.no_grad():
        clean_ce, n = next_token_ce(lm, hp, x, s, _checked(None, check, tick))
        steered_ce, _ = next_token_ce(lm, hp, x, s, _checked(patch, check, tick))
    yield
    gens = {}
    for name, p in (("clean", None), ("steered", patch)):
        new = generate_with_patch(lm, hp, x, _checked(p, check, tick), int(max_new_tokens), tokenizer=lm.tokenizer,
                                  return_ids=True).tolist()
        texts = token_texts(lm.tokenizer, list(ids) + new)[len(ids):]
        gens[name] = {"ids": new, "texts": texts, "text": "".join(texts)}
        if name == "clean":
            yield
    return {"latent": int(latent), "mode": mode, "strength": float(strength), "unit": float(unit),
            "unit_label": "the latent's max activation in the store", "value": float(strength) * float(unit),
            "max_new_tokens": int(max_new_tokens), "prompt_tokens": len(ids),
            "loss": {"clean": clean_ce, "steered": steered_ce, "delta": steered_ce - clean_ce, "targets": n},
            "clean": gens["clean"], "steered": gens["steered"]}


def steer_latent(lm: Any, sae: Any, hook: str, ids: list[int], segs: list[int], latent: int, **kw) -> dict:
    """:func:`steer_steps` run to the end (for scripts and tests)."""
    gen = steer_steps(lm, sae, hook, ids, segs, latent, **kw)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value

