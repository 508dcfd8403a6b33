"""HTML shells of the four pages. They hold no data from the store except through :func:`embed_json` (JSON in a
non-executed ``<script type="application/json">`` block with ``<``, ``>`` and ``&`` escaped as ``\\u003c`` etc.,
so no text can close the block); the front end renders every string with ``textContent``, never as HTML. The
icon is an empty data URL, so no page asks the server for a file it does not have."""

from __future__ import annotations

import html
import json
import math
from importlib import resources
from typing import Any

PAGES = {"list": "Features", "feature": "Feature", "prompt": "Prompt", "compare": "Compare"}
ASSETS = ("app.js", "panels.js", "style.css")
ICON = '<link rel="icon" href="data:,">'
#: The policy in the pages' <meta> (also when opened from disk); the server's header adds frame-ancestors, which
#: a browser only takes from a header (in a <meta> it logs an error).
META_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
            "object-src 'none'; base-uri 'none'")
CSP = META_CSP + "; frame-ancestors 'none'"


def asset_bytes(name: str) -> bytes | None:
    """The vendored asset ``name`` (only names in :data:`ASSETS`; anything else is None)."""
    if name not in ASSETS:
        return None
    return resources.files(__package__).joinpath("assets", name).read_bytes()


def embed_json(data: Any) -> str:
    s = json.dumps(data, ensure_ascii=False, allow_nan=False, default=str)
    return s.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e") \
        .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _clean(obj: Any) -> Any:
    """NaN/inf -> None, recursively (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def render_page(page: str, *, root: str = "/", mode: str = "server", params: dict | None = None,
                data: Any = None, title: str = "") -> str:
    """One page shell. ``root``: prefix of links and assets ("/" served, a relative path in an export)."""
    attrs = {"data-page": page, "data-mode": mode, "data-root": root}
    for k, v in (params or {}).items():
        attrs[f"data-{k}"] = str(v)
    attr_s = " ".join(f'{k}="{html.escape(v, quote=True)}"' for k, v in attrs.items())
    blob = "" if data is None else \
        f'<script type="application/json" id="dsae-data">{embed_json(_clean(data))}</script>\n'
    nav = " ".join(f'<a href="{html.escape(href)}">{label}</a>' for href, label in _nav(root, mode))
    name = html.escape(f"{PAGES.get(page, page)}{' · ' + title if title else ''} — domain-sae")
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{META_CSP}">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{name}</title>\n{ICON}\n'
            f'<link rel="stylesheet" href="{root}assets/style.css"></head>\n<body {attr_s}>\n'
            f'<nav class="top"><span class="brand">domain-sae features</span> {nav}</nav>\n'
            f'<main id="app"><p class="muted">Loading…</p></main>\n{blob}'
            f'<script src="{root}assets/app.js"></script>\n<script src="{root}assets/panels.js"></script>\n'
            f'</body></html>\n')


def _nav(root: str, mode: str) -> list[tuple[str, str]]:
    if mode == "export":
        return [(f"{root}index.html", "Features"), (f"{root}compare.html", "Compare")]
    return [(f"{root}", "Features"), (f"{root}prompt", "Prompt"), (f"{root}compare", "Compare")]


def error_page(message: str) -> str:
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>Not found</title>{ICON}'
            f'<link rel="stylesheet" href="/assets/style.css"></head><body><nav class="top"><a href="/">Features</a>'
            f'</nav><main><h1>Not found</h1><p class="error">{html.escape(message)}</p></main></body></html>\n')
