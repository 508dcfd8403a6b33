"""The report's document model -- headings, paragraphs, bullet lists, tables, figures, code -- and its two
renderers, Markdown and self-contained HTML.

Every piece of text is treated as data: the Markdown renderer escapes it with :mod:`domain_sae.util.markdown` (so a
``<script>`` or a ``|`` in a prompt, a generation or a dataset name stays inert text) and the HTML renderer with
:func:`html.escape`. Emphasis is structure (:attr:`Paragraph.strong`), never markup inside the text.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from ..util.markdown import escape_markdown, markdown_cell, markdown_code


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str
    strong: bool = False


@dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[Any]]


@dataclass(frozen=True)
class FigureRef:
    """A figure by name (a key of the figures dict: name -> PNG path)."""

    name: str


@dataclass(frozen=True)
class Code:
    text: str


Block = Union[Heading, Paragraph, Bullets, Table, FigureRef, Code]


def _md_block(b: Block, figs: dict[str, Path]) -> list[str]:
    if isinstance(b, Heading):
        return ["#" * b.level + " " + escape_markdown(b.text)]
    if isinstance(b, Paragraph):
        text = escape_markdown(b.text)
        return [f"**{text}**" if b.strong else text]
    if isinstance(b, Bullets):
        return [f"- {escape_markdown(x)}" for x in b.items]
    if isinstance(b, Table):
        out = ["| " + " | ".join(markdown_cell(h) for h in b.header) + " |", "|" + "---|" * len(b.header)]
        return out + ["| " + " | ".join(markdown_cell(c) for c in r) + " |" for r in b.rows]
    if isinstance(b, FigureRef):
        return [f"![{escape_markdown(b.name)}]({figs[b.name].name})"]
    if isinstance(b, Code):
        return [markdown_code(b.text)]
    raise TypeError(f"not a report block: {b!r}")


def render_markdown(blocks: list[Block], figs: dict[str, Path]) -> str:
    """The document as Markdown, each block followed by a blank line."""
    out: list[str] = []
    for b in blocks:
        out += _md_block(b, figs) + [""]
    return "\n".join(out)


def _esc(text: Any) -> str:
    return html.escape(str(text))


def _html_block(b: Block, figs: dict[str, Path]) -> str:
    if isinstance(b, Heading):
        return f"<h{b.level}>{_esc(b.text)}</h{b.level}>"
    if isinstance(b, Paragraph):
        return f"<p><b>{_esc(b.text)}</b></p>" if b.strong else f"<p>{_esc(b.text)}</p>"
    if isinstance(b, Bullets):
        return "<ul>" + "".join(f"<li>{_esc(x)}</li>" for x in b.items) + "</ul>"
    if isinstance(b, Table):
        head = "".join(f"<th>{_esc(h)}</th>" for h in b.header)
        rows = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in b.rows)
        return f"<table><tr>{head}</tr>{rows}</table>"
    if isinstance(b, FigureRef):
        data = base64.b64encode(figs[b.name].read_bytes()).decode()
        return (f"<figure><img src='data:image/png;base64,{data}' alt='{_esc(b.name)}'>"
                f"<figcaption>{_esc(figs[b.name].name)}</figcaption></figure>")
    if isinstance(b, Code):
        return f"<pre>{_esc(b.text)}</pre>"
    raise TypeError(f"not a report block: {b!r}")


STYLE = ("body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;line-height:1.45}"
         "table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
         "font-size:13px;vertical-align:top}th{background:#f3f3f3}img{max-width:100%}figure{margin:1em 0}"
         "figcaption{font-size:12px;color:#666}pre{background:#f6f6f6;padding:.6em;font-size:12px;"
         "overflow-x:auto}")


def render_html(blocks: list[Block], figs: dict[str, Path], title: str = "domain-sae study") -> str:
    """The document as one self-contained HTML page (figures embedded as base64 PNG)."""
    body = [_html_block(b, figs) for b in blocks]
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{_esc(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
