"""Request bodies of the model endpoints, checked before any model work (a bad body is answered at once, also on a
server whose model is not loaded yet): a JSON object with known fields only, the prompt fields
(:func:`~domain_sae.features.prompt.check_prompt_input`), an SAE of the store, a latent index in range and
numbers within their bounds. Every refusal is a :class:`BadRequest` (HTTP 400) naming the field and what is
allowed; an unknown SAE is the store's 404."""

from __future__ import annotations

import json
import math

from ..errors import UserError
from ..features.prompt import check_prompt_input
from ..features.queries import FeatureStore

MAX_BODY_BYTES = 64 * 1024


class BadRequest(UserError):
    """A request body the server refuses (answered 400 with the message)."""


def parse_body(raw: bytes, fields: tuple[str, ...], example: str) -> dict:
    """The body as a JSON object holding only ``fields``."""
    if len(raw) > MAX_BODY_BYTES:
        raise BadRequest(f"The request body has {len(raw)} bytes; the limit is {MAX_BODY_BYTES}.")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(f"The request body must be JSON: {example}.") from None
    if not isinstance(body, dict):
        raise BadRequest(f"The request body must be a JSON object: {example}.")
    unknown = set(body) - set(fields)
    if unknown:
        raise BadRequest(f"Unknown field(s) {', '.join(sorted(unknown))[:200]}; use {', '.join(fields)}.")
    return body


def prompt_of(body: dict) -> tuple[str | None, list | None]:
    """``(text, messages)`` of a body, checked (exactly one of them; roles user/assistant/system)."""
    text, messages = body.get("text"), body.get("messages")
    check_prompt_input(text, messages)
    return text, messages


def sae_of(store: FeatureStore, body: dict) -> dict:
    ref = body.get("sae")
    if ref is not None and not isinstance(ref, (str, int)):
        raise BadRequest("'sae' must be an SAE label or id.")
    return store.sae(ref)


def latent_of(body: dict, sae: dict) -> int:
    v = body.get("latent")
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(f"'latent' must be an integer latent index (got {json.dumps(v)[:40]}).")
    if not 0 <= v < sae["d_sae"]:
        raise BadRequest(f"SAE {sae['label']} has latents 0..{sae['d_sae'] - 1}; there is no latent {v}.")
    return v


def number_of(body: dict, key: str, default: float, lo: float, hi: float, *, integer: bool = False) -> float:
    """``body[key]`` (or ``default``), a finite number in [lo, hi] (an integer when ``integer``)."""
    v = body.get(key, default)
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not math.isfinite(v):
        raise BadRequest(f"'{key}' must be {'an integer' if integer else 'a number'} (got {json.dumps(v)[:40]}).")
    if not lo <= v <= hi:
        raise BadRequest(f"'{key}' must be between {lo:g} and {hi:g} (got {v}).")
    return int(v) if integer else float(v)


def choice_of(body: dict, key: str, choices: tuple[str, ...]) -> str:
    v = body.get(key, choices[0])
    if v not in choices:
        raise BadRequest(f"'{key}' must be one of {', '.join(choices)} (got {json.dumps(v)[:40]}).")
    return v
