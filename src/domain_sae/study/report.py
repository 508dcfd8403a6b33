"""results.json, report.md, a self-contained report.html (PNG figures embedded, also written alongside) for every
study: :mod:`.findings` gives the answer, :mod:`.figures` the plots, :mod:`.sections` the document (the blocks of
:mod:`.document`, rendered to Markdown and HTML with every piece of text escaped).

The renderer reads only the JSON-ready results dict, so :func:`render_from_json` re-renders a report from its
results.json. results.json (strict JSON, ``schema_version`` 2) holds:

- ``question``, ``answer`` (at most five sentences), ``config`` (the StudyConfig), ``model``, ``versions``,
  ``estimate``, ``timing_seconds``;
- ``runs``: run id -> {kind, condition, domain, seed, sparsity, budget, tokens, parent};
- ``hooks``: hook -> {``d_in``, ``sampling`` (held-out documents per corpus), ``measurements`` (run id ->
  {``recon``: set -> {ev, ev_se, l0, tokens}, ``lm``: set -> {metrics, se, segments, tokens}}), ``main`` (label ->
  run id), ``findings`` (domain -> :func:`.findings.domain_findings`), ``analyses`` (name -> result), ``seconds``}.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..config import from_dict
from ..errors import UserError
from ..util.atomic import atomic_write_text
from ..util.jsonsafe import jsonable, write_json
from .config import StudyConfig
from .document import render_html, render_markdown
from .figures import make_figures
from .findings import answer
from .sections import document

SCHEMA, SCHEMA_VERSION = "domain-sae/study-results", 2
REQUIRED_KEYS = ("question", "config", "model", "runs", "hooks")


class ReportError(UserError, ValueError):
    """The results dict lacks what the report needs (e.g. a results.json from another tool or an older schema)."""


def check_results(res: dict) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in res]
    if missing or res.get("schema_version") != SCHEMA_VERSION:
        raise ReportError(f"The results lack {missing or 'nothing'} and have schema version "
                          f"{res.get('schema_version')}: they do not come from this version of `dsae compare` "
                          f"(schema version {SCHEMA_VERSION}). Re-run the study to regenerate results.json.")


def write_report(results: dict, out: str | Path) -> dict[str, Path]:
    """Write results.json (with the answer), the PNG figures, report.md and report.html into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    res = jsonable(results)
    check_results(res)
    cfg = from_dict(StudyConfig, res["config"], source="results.json config")
    res["answer"] = results["answer"] = answer(cfg, res["hooks"])
    write_json(out / "results.json", res, indent=1)
    figs = make_figures(res, out)
    blocks = document(res, figs)
    atomic_write_text(out / "report.md", render_markdown(blocks, figs))
    atomic_write_text(out / "report.html", render_html(blocks, figs, title="domain-sae study"))
    return {"report_html": out / "report.html", "report_md": out / "report.md", "results_json": out / "results.json"}


def render_from_json(results_json: str | Path, out: Optional[str | Path] = None) -> dict[str, Path]:
    """Re-render the report from a results.json (e.g. after changing the report code)."""
    p = Path(results_json)
    return write_report(json.loads(p.read_text()), out or p.parent)
