"""The study's findings and report from SYNTHETIC run points: the tests and gap fractions against hand-computed values
(several seeds: Welch; one seed: the yardstick), the answer's length and content, the files (self-contained HTML,
strict JSON, re-rendering), plot labelling, and text from data escaped in both formats."""

from __future__ import annotations

import json
import math
import re

import pytest

from domain_sae.analysis.matched import RunPoint
from domain_sae.config import to_dict
from domain_sae.study import figures as F
from domain_sae.study.config import GENERAL, StudyConfig
from domain_sae.study.findings import FACTOR, MIN_SPREAD, answer, compare, domain_findings, yardstick
from domain_sae.study.report import ReportError, render_from_json, write_report

HOOK = "blocks.0.hook_mlp_out"
FT, SC, SB = "general→chat @ 256", "chat scratch", "chat scratch @ 256"


def _cfg(**kw) -> StudyConfig:
    values = dict(domains={"chat": "chat"}, architecture="topk", sparsity=[16, 64], seeds=[1, 2, 3],
                  control_seed=None, budgets=[128, 256], general_tokens=512, scratch_tokens=512,
                  train_batch_size_tokens=128, buffer_size_tokens=512, residual_tokens=256,
                  conditions=["general", "scratch", "finetune", "scratch_budget"])
    values.update(kw)
    return StudyConfig(**values).validate()


def points(values: dict, seeds=(1, 2, 3), ks=(16, 64), on_general: float | None = None) -> list[RunPoint]:
    """Run points of each condition: metric = value + k / 1000 + 0.001 * seed (per-document se 1e-4)."""
    out = []
    for cond, v in values.items():
        for s in seeds:
            for k in ks:
                m = {"l0": float(k), "l0_measured": float(k), "ev": v + k / 1000 + 0.001 * s, "ce": v + 0.3 + 0.001 * s}
                if on_general is not None:
                    m["ev"] = m["ce"] = on_general + 0.001 * s
                out.append(RunPoint(cond, s, k, m, {"ev": 1e-4, "ce": 1e-4}))
    return out


VALUES = {GENERAL: 0.5, SC: 0.6, "general→chat @ 128": 0.53, FT: 0.58, "chat scratch @ 128": 0.4, SB: 0.45}


def test_welch_findings_and_gap_fractions():
    cfg = _cfg()
    gen = points({GENERAL: 0, "general→chat @ 128": 0, FT: 0}, on_general=0.7)
    dom = domain_findings(cfg, "chat", points(VALUES), gen)
    ev = dom["metrics"]["ev"]
    assert ev["l0"] == 64.0  # the ladder's middle k
    diff = {(x["a"], x["b"]): x for x in ev["differences"]}
    assert diff[(SC, GENERAL)]["diff"] == pytest.approx(0.1) and diff[(SC, GENERAL)]["is_difference"]
    assert {x["test"] for x in ev["differences"]} == {"welch"}
    row = next(r for r in ev["gaps"]["finetune"]["budgets"] if r["budget"] == 256)
    assert row["fraction"] == pytest.approx(0.8) and row["defined"]  # (0.58 - 0.5) / (0.6 - 0.5)
    sb = next(r for r in ev["gaps"]["scratch_budget"]["budgets"] if r["budget"] == 256)
    assert sb["fraction"] == pytest.approx(-0.5)  # the token-matched scratch SAE is worse than general
    assert ev["gaps"]["finetune"]["smallest_budget"]["0.5"]["status"] == "reached"
    assert not ev["forgetting"]["finetune"][0]["is_difference"]  # the same on general data
    assert ev["table"]["by_l0"][0][GENERAL]["n"] == 3


def test_one_seed_uses_the_yardstick_of_the_general_seeds():
    """The demo's shape: one seed per condition, two of the general SAE (its control); one sparsity value."""
    cfg = _cfg(seeds=[1], control_seed=2, sparsity=[5.0], architecture="standard")
    pts = points({GENERAL: 0.5}, seeds=(1, 2), ks=(5,)) + points({SC: 0.6, FT: 0.58, "general→chat @ 128": 0.55,
                                                                  SB: 0.4, "chat scratch @ 128": 0.3},
                                                                 seeds=(1,), ks=(5,))
    yard = yardstick(pts, "ev", 5.0)
    assert yard == pytest.approx(max(0.001, MIN_SPREAD))  # max - min of the general seeds, floored
    r = compare(pts, SC, GENERAL, "ev", 5.0, yard)
    assert r["test"] == "yardstick" and r["diff"] == pytest.approx((0.6 + 0.001) - (0.5 + 0.0015))
    assert r["is_difference"] and r["threshold"] == pytest.approx(FACTOR * yard)
    same = compare(pts, FT, SC, "ev", 5.0, yard)
    assert same["diff"] == pytest.approx(-0.02) and same["is_difference"]  # 0.02 > 2 x 0.002
    dom = domain_findings(cfg, "chat", pts, [])
    assert not dom["matched"]
    g = dom["metrics"]["ev"]["gaps"]["finetune"]
    assert g["test"] == "yardstick"
    row = next(x for x in g["budgets"] if x["budget"] == 256)
    assert row["defined"] and row["fraction"] == pytest.approx((0.581 - 0.5015) / (0.601 - 0.5015))
    assert row["text"] == f"{100 * row['fraction']:.0f}%"
    # scratch worse than general: no gap to close (whatever the fine-tune does)
    worse = domain_findings(cfg, "chat", [p for p in pts if p.condition != SC] + points({SC: 0.3}, seeds=(1,),
                                                                                     ks=(5,)), [])
    assert not any(r["defined"] for r in worse["metrics"]["ev"]["gaps"]["finetune"]["budgets"])


def synthetic_results(cfg: StudyConfig, evil: str = "") -> dict:
    gen = points({GENERAL: 0, "general→chat @ 128": 0, FT: 0}, on_general=0.7)
    dom = domain_findings(cfg, "chat", points(VALUES), gen)
    ks = list(range(1, 65))
    dirs = [f"chat scratch latent 5 {evil}", "random"]
    steering = {"domain": "chat", "chosen": {"chat scratch": {"latent": 5, "mean_activation_difference": 0.4}},
                "directions": dirs, "mean_activation_norm": 20.0, "relative_strengths": [1.0],
                "add": {"strengths": [20.0], "clean_ce": {"chat": 3.0},
                        "ce_change": {n: {"chat": [0.1]} for n in dirs},
                        "generations": {"clean": [f"hello {evil}"], **{n: {"20.0": ["c|d\ne"]} for n in dirs}}},
                "ablate": {"strengths": [1.0], "clean_ce": {"chat": 3.0}, "ce_change": {dirs[0]: {"chat": [0.05]}}},
                "prompts": [f"p1 {evil}"], "tokens": {"chat": 64}}
    hist = {"mean": 0.6, "hist_counts": [1] * 50, "hist_edges": [-1 + 0.04 * i for i in range(51)]}
    overlap = {"threshold": 0.7, "drift": {}, "pairs": {f"general vs {SC}": {
        "a": GENERAL, "b": SC, "max_cos_a_to_b": hist, "max_cos_b_to_a": hist,
        "hungarian": {"matched_fraction": 0.4, "mean_cosine": 0.8}}},
        "domain_specific": {"chat": {"count": 1, "top": [{"latent": 7, "density": 0.01, "examples": [
            {"value": 2.0, "prefix": "hi ", "token": evil or "x", "suffix": "\nbye"}]}]}}}
    directions = {"labels": [f"code {evil}", "small talk"], "n_prompts": [2, 2],
                  "example_prompts": [[f"Write {evil}"], ["hi *there*"]],
                  "per_sae": {GENERAL: {"reconstruction_cosine": 0.5, "best_latent_cosine": 0.3, "best_latent": 1,
                                        "ks": ks, "topk_lstsq_rel_error": [1 / math.sqrt(k) for k in ks],
                                        "omp_rel_error": [0.9 / math.sqrt(k) for k in ks]}}}
    runs = {"general_seed1_k_16": {"kind": "general", "condition": GENERAL, "domain": None, "seed": 1,
                                   "sparsity": 16, "budget": None, "tokens": 512, "parent": None}}
    meas = {"general_seed1_k_16": {"recon": {GENERAL: {"ev": 0.5, "l0": 16.0}}, "lm": {}}}
    hook = {"d_in": 8, "sampling": {"chat": {"documents": 9, "heldout_documents": 30}}, "measurements": meas,
            "main": {}, "findings": {"chat": dom}, "seconds": {"a": 1.0, "b": 2.0, "c": 3.0},
            "analyses": {"overlap": overlap, "directions": directions, "steering": steering}}
    return {"schema": "domain-sae/study-results", "schema_version": 2, "question": "Q?", "config": to_dict(cfg),
            "model": {"name": "tiny", "source": "test"}, "estimate": {"minutes": 0.1, "rates": "assumed"},
            "runs": runs, "hooks": {HOOK: hook}, "versions": {"python": "3"}, "timing_seconds": {"total": 3.0}}


def test_answer_is_at_most_five_sentences_with_the_numbers():
    cfg = _cfg()
    text = answer(cfg, synthetic_results(cfg)["hooks"])
    assert 3 <= len(text) <= 5
    assert text[0].startswith("Fine-tuning the general SAE on 256 domain tokens (50% of a scratch SAE's 512)")
    assert "0 of 1" in text[0]  # fine-tuned - scratch = -0.02, beyond t x se and the seed spread of 0.001
    assert "gap closed 80%" in text[1] and "controls: scratch_budget -50%" in text[1]
    assert text[-1].startswith("Differences are called by a Welch test")


def test_report_files_open_with_the_answer_and_are_self_contained(tmp_path):
    cfg = _cfg()
    paths = write_report(synthetic_results(cfg), tmp_path)
    md, html = paths["report_md"].read_text(), paths["report_html"].read_text()
    stored = json.loads(paths["results_json"].read_text(), parse_constant=lambda x: pytest.fail(x))
    assert stored["answer"][0].startswith("Fine-tuning")
    assert md.index("## Answer") < md.index("![answer](answer.png)") < md.index("## Setup")
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert {"answer.png", f"gap_{HOOK}_chat.png", f"frontier_{HOOK}_chat.png"} <= set(pngs)
    assert html.count("data:image/png;base64,") == len(pngs)
    assert not re.search(r"(src|href)=['\"](?!data:)", html) and html.rstrip().endswith("</html>")
    assert html.count("<table>") == html.count("</table>") == md.count("\n|---|")
    assert "Held-out documents at" in md and "chat 9 of 30" in md
    again = render_from_json(paths["results_json"], tmp_path / "b")
    assert again["report_md"].read_text() == md


def test_reports_refuse_other_results(tmp_path):
    res = synthetic_results(_cfg())
    res["schema_version"] = 1
    with pytest.raises(ReportError, match="schema version"):
        write_report(res, tmp_path)
    del res["hooks"]
    with pytest.raises(ReportError, match="hooks"):
        write_report(res, tmp_path)


def test_every_plot_has_title_and_axis_labels(tmp_path, monkeypatch):
    seen = []
    original = F.save_figure

    def checking_save(fig, path):
        for ax in fig.axes:
            seen.append(path.name)
            assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel(), path.name
        return original(fig, path)

    monkeypatch.setattr(F, "save_figure", checking_save)
    F.make_figures(json.loads(json.dumps(synthetic_results(_cfg()))), tmp_path)
    assert {"answer.png", f"gap_{HOOK}_chat.png", f"matching_{HOOK}.png", f"steering_{HOOK}.png",
            f"direction_capture_{HOOK}.png"} <= set(seen)


def test_text_from_data_is_escaped_in_markdown_and_html(tmp_path):
    """Prompts, generations, example contexts and labels come from data or users: a ``<script>`` in any of them
    reaches report.md / report.html as inert text, and table rows keep their column count."""
    evil = "<script>alert(1)</script>"
    paths = write_report(synthetic_results(_cfg(), evil), tmp_path)
    md, html = paths["report_md"].read_text(), paths["report_html"].read_text()
    md = re.sub(r"^(`{3,})\n.*?\n\1$", "", md, flags=re.S | re.M)  # the config as a fenced block is inert
    assert "<script>" not in md and "<script>" not in html
    assert md.count("&lt;script&gt;") >= 5 and html.count("&lt;script&gt;") >= 5
    assert "hi \\*there\\*" in md
    header = next(ln for ln in md.splitlines() if ln.startswith("| direction added |"))
    rows = [ln for ln in md.splitlines() if ln.startswith("| random |") and "c\\|d" in ln]
    assert rows and all(ln.replace("\\|", "").count(" | ") == header.count(" | ") for ln in rows)
    assert "c\\|d⏎e" in md


def test_document_renderers_escape_every_block_kind():
    from domain_sae.study.document import Bullets, Code, Heading, Paragraph, Table, render_html, render_markdown
    evil = "<b>x</b> **y** [z](http://e)"
    blocks = [Heading(evil, 1), Paragraph(evil), Paragraph(evil, strong=True), Bullets([evil]),
              Table([evil], [[evil]]), Code("```\n" + evil)]
    md, html = render_markdown(blocks, {}), render_html(blocks, {})
    prose, code = md.split("````\n", 1)
    assert "<b>x" not in prose and "](http" not in prose.replace("\\](http", "")
    assert "\\*\\*y\\*\\*" in prose and prose.count("&lt;b&gt;") == 6
    assert "````\n```\n<b>x</b>" in md
    assert "<b>x</b>" not in html and html.count("&lt;b&gt;x&lt;/b&gt;") == 7
