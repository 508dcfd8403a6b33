"""Markdown that is safe to render: every piece of text from data, prompts or generations goes through here.

Markdown renderers pass inline HTML through, so text written into a ``.md`` report must be escaped, not trusted:

    escape_markdown(s)  = HTML-escape (&, <, >) and backslash-escape Markdown's inline markup (\\ ` * _ [ ] |)
    markdown_cell(s)    = escape_markdown(s) with newlines shown as the two characters ``\\n`` (one table row)
    markdown_code(s)    = s inside a fenced block whose fence is longer than any backtick run in s

Numbers and our own fixed labels need no escaping; anything a user or a dataset supplied does.
"""

from __future__ import annotations

import html
import re

_INLINE = re.compile(r"([\\`*_\[\]|])")


def escape_markdown(text: object) -> str:
    """``text`` as literal Markdown: no HTML tags, no emphasis, links or table breaks can come from it."""
    return _INLINE.sub(r"\\\1", html.escape(str(text), quote=False))


def markdown_cell(text: object) -> str:
    """``text`` escaped for one Markdown table cell (newlines shown as ``\\n``, carriage returns dropped)."""
    return escape_markdown(str(text).replace("\r", "").replace("\n", "\\n"))


def markdown_code(text: str, language: str = "") -> str:
    """A fenced code block holding ``text`` verbatim (the fence outgrows any run of backticks inside)."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text}\n{fence}"
