"""Hugging Face plumbing shared by models/, data/ and sae/ (the one definition of each):

- :func:`hub_offline_reason` / :func:`hub_reachable`: may the hub be used now? No when an offline variable is set
  (``HF_HUB_OFFLINE``, plus the caller's own such as ``TRANSFORMERS_OFFLINE``) or the endpoint (``HF_ENDPOINT``,
  default https://huggingface.co) does not accept a TCP connection within the timeout. The probe runs in a daemon
  thread, so a stuck DNS lookup cannot hang the caller: loading fails in seconds instead of hanging offline.
- :func:`max_context`: the longest sequence a model's position embeddings support, from its config.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any, Optional, Sequence
from urllib.parse import urlparse

HUB_CHECK_TIMEOUT_S = 3.0
DEFAULT_ENDPOINT = "https://huggingface.co"
_TRUE = {"1", "true", "yes", "on"}


def env_true(var: str) -> bool:
    """Is the environment variable ``var`` set to 1/true/yes/on (any case)?"""
    return os.environ.get(var, "").strip().lower() in _TRUE


def hub_endpoint() -> tuple[str, int]:
    """(host, port) of ``HF_ENDPOINT`` (default https://huggingface.co; port 80 for http, else 443). Raises
    ``ValueError`` for an unparsable port."""
    endpoint = os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    u = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
    return u.hostname or "huggingface.co", u.port or (80 if u.scheme == "http" else 443)


def hub_offline_reason(timeout_s: float = HUB_CHECK_TIMEOUT_S,
                       offline_vars: Sequence[str] = ("HF_HUB_OFFLINE",)) -> Optional[str]:
    """Why the hub cannot be used right now, or None when it can (see the module docstring)."""
    for var in offline_vars:
        if env_true(var):
            return f"{var}={os.environ[var]} is set"
    try:
        host, port = hub_endpoint()
    except ValueError as e:
        return f"HF_ENDPOINT={os.environ.get('HF_ENDPOINT')!r} is not a valid URL ({e})"
    result: dict[str, Any] = {}

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                result["ok"] = True
        except OSError as e:
            result["error"] = e

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout_s + 0.5)
    if result.get("ok"):
        return None
    err = result.get("error")
    return f"the hub host {host}:{port} is unreachable ({err or f'no answer within {timeout_s:.0f} s'})"


def hub_reachable(timeout_s: float = HUB_CHECK_TIMEOUT_S, offline_vars: Sequence[str] = ("HF_HUB_OFFLINE",)) -> bool:
    """``hub_offline_reason(...) is None``."""
    return hub_offline_reason(timeout_s, offline_vars) is None


def max_context(model: Any) -> Optional[int]:
    """Longest sequence the model's position embeddings support: ``config.max_position_embeddings`` (Llama, Qwen2,
    Mistral, GPT-NeoX), else ``n_positions`` / ``n_ctx`` (GPT-2); ``None`` when the config says nothing (or
    ``model`` is not a transformers model). Multimodal configs are read through ``get_text_config()``."""
    cfg = getattr(model, "config", None)  # a third-party object: transformers models carry a config, others don't
    cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None
