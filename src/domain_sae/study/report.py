"""results.json, report.md and a self-contained report.html (PNG plots embedded as base64, also written alongside)
for the domain-adaptation study.

The report is built in three steps, each in its own module: :mod:`.findings` (the numbers and the answer in
sentences, with the seed-to-seed yardstick), :mod:`.figures` (one function per plot) and :mod:`.sections` (the
document, as the blocks of :mod:`.document`, rendered to Markdown and HTML with every piece of text escaped).

The renderer only reads the JSON-ready results dict (what results.json holds), so a report can be re-rendered from
a results.json with :func:`render_from_json`. results.json (``schema_version`` 1) holds:

- ``config`` (the StudyConfig), ``domains``, ``model`` {name, hook, source, d_in, d_sae}, ``versions``;
- ``saes``: name -> {kind, domain, training_tokens, parent_tokens, total_tokens, seed, lineage};
- ``data``: cache_tokens per domain, held-out sequences, recon_tokens_counted, eval_sets {tokens, lm_counted, ...};
- ``matrix``: SAE -> eval set -> SPEC 3 metrics (CE/KL with the model + reconstruction) and ``segments``;
- ``recon``: SAE -> set -> {explained_variance, mse, cossim, l0, dead_fraction, relative_reconstruction_bias} on the
  larger reconstruction sets; ``budgets``: domain -> {tokens, scratch, finetuned, finetuned_on_general} (one recon
  dict per budget);
- ``overlap``: threshold, pairs ("A vs B" -> max_cos_a_to_b / max_cos_b_to_a histograms, hungarian), drift,
  domain_specific (count, top latents with example contexts);
- ``directions``: labels, n_prompts, example_prompts, per_sae (analysis.directions.direction_capture);
- ``steering``: domain, chosen latents, add / ablate (analysis.steering.steering_sweep), prompts, tokens;
- ``stages`` (seconds, tokens per kind, what), ``timing_seconds``, ``estimate``, ``answer`` (the sentences).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..errors import UserError
from ..util.jsonsafe import jsonable
from .config import CONTROL, GENERAL
from .document import render_html, render_markdown
from .figures import make_plots
from .findings import CES, EV, FACTOR, L0, MIN_SPREAD, answer, domain_findings, spread, verdict
from .sections import document

__all__ = ["write_report", "render_from_json", "check_results", "ReportError", "answer", "domain_findings",
           "make_plots", "spread", "verdict", "CES", "EV", "L0", "FACTOR", "MIN_SPREAD"]

REQUIRED_KEYS = ("config", "domains", "model", "saes", "matrix", "recon", "budgets", "overlap", "directions",
                 "steering", "stages")


class ReportError(UserError, ValueError):
    """The results dict lacks what the report needs (e.g. a results.json from another tool or an older schema)."""


def check_results(res: dict) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in res]
    if missing:
        raise ReportError(f"The results lack {missing}; they do not come from `dsae compare` (schema version 1). "
                          f"Re-run the study to regenerate results.json.")
    for name in (GENERAL, CONTROL):
        if name not in res["matrix"]:
            raise ReportError(f"The results lack the {name!r} SAE, which the report needs as its yardstick.")


def write_report(results: dict, out: str | Path) -> dict[str, Path]:
    """Write results.json (with the answer), the PNG plots, report.md and report.html into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    res = jsonable(results)
    check_results(res)
    res["answer"] = answer(res)
    results["answer"] = res["answer"]
    (out / "results.json").write_text(json.dumps(res, indent=1, allow_nan=False) + "\n")
    figs = make_plots(res, out)
    blocks = document(res, figs)
    (out / "report.md").write_text(render_markdown(blocks, figs))
    (out / "report.html").write_text(render_html(blocks, figs))
    return {"report_html": out / "report.html", "report_md": out / "report.md", "results_json": out / "results.json"}


def render_from_json(results_json: str | Path, out: Optional[str | Path] = None) -> dict[str, Path]:
    """Re-render the report from a results.json (e.g. after changing the report code)."""
    p = Path(results_json)
    return write_report(json.loads(p.read_text()), out or p.parent)
