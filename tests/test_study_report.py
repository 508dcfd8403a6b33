"""The study report rendered from a SYNTHETIC results dict: files, self-containment, the answer's logic against
hand-computed verdicts, plot labelling, robustness to missing numbers."""

from __future__ import annotations

import json
import math
import re

import pytest

from domain_sae.study import figures as F
from domain_sae.study import report as R
from domain_sae.study.config import CONTROL, GENERAL, StudyConfig, finetuned_name, scratch_name

SEG = {"user": {}, "assistant": {}, "template": {}}


def _cell(ces, ev, l0=20.0):
    return {R.CES: ces, R.EV: ev, R.L0: l0, "metrics/delta_loss": (1 - ces) * 2.0, "metrics/kl_div_score": ces,
            "sparsity/dead_fraction": 0.1, "metrics/ce_loss_without_sae": 3.0, "metrics/ce_loss_with_ablation": 9.0,
            "tokens/reconstruction_counted": 100,
            "segments": {n: {R.EV: ev, R.CES: ces, "tokens/reconstruction_counted": 30} for n in SEG}}


def _hist(center):
    edges = [-1 + 0.04 * i for i in range(51)]
    counts = [0] * 50
    counts[min(49, int((center + 1) / 0.04))] = 64
    return {"mean": center, "median": center, "frac_above_threshold": float(center >= 0.7),
            "hist_counts": counts, "hist_edges": edges}


def synthetic_results(domains=("chat", "code"), *, general=0.80, control=0.81, scratch=0.90, finetuned=0.895,
                      ft_on_general=0.80, ev_offset=-0.1):
    """A results dict with the schema of run_study: CE-loss scores as given (same on every domain), EV = CE score
    + ev_offset; the general SAEs score ``general``/``control`` everywhere."""
    cfg = StudyConfig(domains={d: d for d in domains}, budgets=[25_000, 50_000, 100_000])
    names = cfg.sae_names()
    sets = [GENERAL, *domains]
    score = {GENERAL: general, CONTROL: control}
    for d in domains:
        score[scratch_name(d)] = scratch
        score[finetuned_name(d)] = finetuned
    matrix = {}
    for n in names:
        matrix[n] = {}
        for s in sets:
            v = score[n]
            if n.startswith(f"{GENERAL}→") and s == GENERAL:
                v = ft_on_general
            if n.endswith("scratch") and s not in (GENERAL, n.split()[0]):
                v = general - 0.1  # a domain SAE on the other domain
            matrix[n][s] = _cell(v, v + ev_offset)
    recon = {n: {s: {"explained_variance": c[R.EV], "l0": c[R.L0], "mse": 1.0} for s, c in per.items()}
             for n, per in matrix.items()}
    budgets = {d: {"tokens": list(cfg.budgets),
                   "scratch": [{"explained_variance": 0.5 + 0.1 * i, "l0": 30.0} for i in range(3)],
                   "finetuned": [{"explained_variance": 0.75 + 0.01 * i, "l0": 25.0} for i in range(3)],
                   "finetuned_on_general": [{"explained_variance": 0.7, "l0": 25.0} for _ in range(3)]}
               for d in domains}
    pairs = {}
    for a, b in [(GENERAL, CONTROL)] + [(GENERAL, scratch_name(d)) for d in domains] + \
            [(GENERAL, finetuned_name(d)) for d in domains]:
        c = 0.95 if "→" in b else 0.6
        pairs[f"{a} vs {b}"] = {"a": a, "b": b, "threshold": 0.7, "max_cos_a_to_b": _hist(c),
                                "max_cos_b_to_a": _hist(c),
                                "hungarian": {"matched_fraction": c, "mean_cosine": c, "n_pairs": 64}}
    drift = {finetuned_name(d): {"mean": 0.97, "median": 0.99, "frac_below_0.9": 0.05, "frac_below_0.5": 0.01,
                                 **{k: v for k, v in _hist(0.97).items() if k.startswith("hist")}} for d in domains}
    spec = {d: {"count": 3, "top": [{"latent": 7, "density": 0.01, "examples": [
        {"value": 2.0, "prefix": "def f(x", "token": ")", "suffix": ":\n    return"}]}]} for d in domains}
    ks = list(range(1, 65))
    per = {n: {"reconstruction_cosine": 0.5 + 0.01 * i, "best_latent_cosine": 0.3, "best_latent": i, "ks": ks,
               "topk_lstsq_rel_error": [1 / math.sqrt(k) for k in ks],
               "omp_rel_error": [0.9 / math.sqrt(k) for k in ks]}
           for i, n in enumerate(names)}
    dirs = ["code scratch latent 5", "general→code latent 9", "diff-of-means", "random"]
    strengths = [0.5, 1.0]
    add = {"mode": "add", "strengths": [10.0, 20.0], "clean_ce": {d: 3.0 for d in domains},
           "ce_change": {n: {d: [0.1 * (i + 1), 0.2 * (i + 1)] for d in domains} for i, n in enumerate(dirs)},
           "generations": {"clean": ["hello", "hi"],
                           **{n: {"10.0": ["a", "b"], "20.0": ["c|d", "e\nf"]} for n in dirs}}}
    ablate = {"mode": "ablate", "strengths": [1.0], "clean_ce": {d: 3.0 for d in domains},
              "ce_change": {n: {d: [0.05] for d in domains} for n in dirs[:-1]}, "generations": {}}
    info = {n: {"kind": "x", "domain": None, "training_tokens": 1000, "parent_tokens": 0, "total_tokens": 1000,
                "seed": 1, "lineage": None} for n in names}
    return {
        "schema": "domain-sae/study-results", "schema_version": 1, "question": "Q?",
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "domains": list(domains),
        "model": {"name": "tiny", "hook": "blocks.0.hook_mlp_out", "source": "test", "d_in": 8, "d_sae": 64},
        "data": {"cache_tokens": {d: 1000 for d in domains}, "recon_tokens_counted": {s: 500 for s in sets},
                 "eval_sets": {s: {"sequences": 2, "tokens": 256, "lm_counted": 250, "reconstruction_counted": 250}
                               for s in sets}},
        "saes": info, "matrix": matrix, "recon": recon, "budgets": budgets,
        "overlap": {"threshold": 0.7, "pairs": pairs, "drift": drift, "domain_specific": spec},
        "directions": {"labels": ["code requests", "small talk"], "n_prompts": [4, 4],
                       "example_prompts": [["Write a function"], ["hi there"]], "per_sae": per},
        "steering": {"domain": "code" if "code" in domains else domains[0],
                     "chosen": {"code scratch": {"latent": 5, "mean_activation_difference": 0.4, "density": {}}},
                     "directions": dirs, "mean_activation_norm": 20.0, "relative_strengths": strengths,
                     "add": add, "ablate": ablate, "prompts": ["p1", "p2"], "tokens": {d: 256 for d in domains}},
        "stages": {"load": {"what": "load", "tokens": {}, "seconds": 1.0},
                   "train": {"what": "train", "tokens": {"sae": 6000}, "seconds": 2.0}},
        "timing_seconds": {"load": 1.0, "train": 2.0, "total": 3.0},
        "estimate": {"minutes": 0.1, "rates": {"source": "assumed"}},
    }


# ----------------------------------------------------------------------------------------------------------------

def test_spread_and_verdict():
    assert R.spread(0.80, 0.81) == pytest.approx(0.01)
    assert R.spread(0.5, 0.5) == R.MIN_SPREAD
    assert math.isnan(R.spread(None, 0.5))
    assert R.verdict(0.03, 0.01) == "higher" and R.verdict(-0.03, 0.01) == "lower"
    assert R.verdict(0.02, 0.01) == "same"  # exactly 2x the spread is not beyond it
    assert R.verdict(math.nan, 0.01) == "unknown"


def test_answer_yes_when_finetuned_matches_scratch():
    res = synthetic_results(general=0.80, control=0.81, scratch=0.90, finetuned=0.895)
    fd = R.domain_findings(res, "chat")
    assert fd["ce"]["spread"] == pytest.approx(0.01)
    assert fd["benefit"] == "yes" and fd["ft_vs_scratch"] == "same" and fd["ft_vs_general"] == "better"
    assert fd["recovered"] == pytest.approx((0.895 - 0.80) / (0.90 - 0.80))
    text = R.answer(res)
    assert text[0].startswith("Bottom line: on chat, yes") and "on code, yes" in text[0]
    assert any("95%" in s for s in text)  # recovered fraction printed


def test_answer_not_at_this_budget_and_no_benefit():
    res = synthetic_results(general=0.80, control=0.81, scratch=0.90, finetuned=0.85)
    fd = R.domain_findings(res, "code")
    assert fd["ft_vs_scratch"] == "worse"
    assert fd["recovered"] == pytest.approx(0.5)
    assert "not at this budget" in R.answer(res)[0] and "50%" in R.answer(res)[0]

    res = synthetic_results(general=0.80, control=0.81, scratch=0.815, finetuned=0.82)
    assert R.domain_findings(res, "chat")["benefit"] == "same"
    assert "no domain benefit to recover" in R.answer(res)[0]


def test_forgetting_and_curve_findings():
    res = synthetic_results(general=0.80, control=0.805, ft_on_general=0.70)
    fd = R.domain_findings(res, "chat")
    assert fd["forgetting"] == "forgets"
    # curve: recon spread = |0.70 - 0.705| = 0.005; fine-tuned EV 0.75.. vs scratch 0.5..0.7 -> ahead at 3 of 3
    cur = fd["curve"]
    assert cur["ft_wins"] == 3 and cur["scratch_wins"] == 0 and cur["n"] == 3
    # full scratch EV = 0.90 - 0.1 = 0.80; fine-tuned ladder peaks at 0.77: never reaches it within 2 x 0.005
    assert cur["ft_reaches_full_at"] is None
    assert any("no fine-tuning budget" in s for s in R.answer(res))


def test_write_report_files_self_contained(tmp_path):
    res = synthetic_results()
    paths = R.write_report(res, tmp_path)
    html = paths["report_html"].read_text()
    md = paths["report_md"].read_text()
    stored = json.loads(paths["results_json"].read_text())
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(pngs) >= 10
    # self-contained: every image inline, no external references
    assert html.count("data:image/png;base64,") == len(pngs)
    assert not re.search(r"(src|href)=['\"](?!data:)", html)
    assert html.count("<table>") == html.count("</table>") == md.count("\n|---|") and html.rstrip().endswith("</html>")
    # opens with the answer
    assert md.index("## Answer") < md.index("## Matrix")
    assert stored["answer"][0].startswith("Bottom line:")
    assert "Bottom line:" in html[:html.index("<table>")]
    # stages, tokens and config are stated
    assert "| train | 2 | 6,000 sae |" in md
    assert '"general_tokens": 400000' in md
    # markdown tables keep their column count (names with '|' or newlines are escaped)
    header = next(ln for ln in md.splitlines() if ln.startswith("| direction added |"))
    gen_rows = [ln for ln in md.splitlines() if ln.startswith("| random |") and "c\\|d" in ln]
    assert gen_rows and all(ln.replace("\\|", "").count(" | ") == header.count(" | ") for ln in gen_rows)
    assert "e⏎f" in md


def test_every_plot_has_title_and_axis_labels(tmp_path, monkeypatch):
    seen = []
    original = F.save_figure

    def checking_save(fig, path):
        for ax in fig.axes:
            if ax.get_label() == "<colorbar>":
                continue
            seen.append(path.name)
            assert ax.get_title(), f"{path.name}: an axes without a title"
            assert ax.get_xlabel() and ax.get_ylabel(), f"{path.name}: an axes without axis labels"
        return original(fig, path)

    monkeypatch.setattr(F, "save_figure", checking_save)
    F.make_plots(synthetic_results(), tmp_path)
    assert {"token_efficiency.png", "forgetting.png", "max_cosine.png", "matching.png", "drift.png",
            "direction_capture.png", "steering.png"} <= set(seen)


def test_missing_numbers_render_as_na(tmp_path):
    res = synthetic_results()
    res["matrix"][scratch_name("chat")]["chat"][R.CES] = float("nan")
    res["overlap"]["pairs"][f"{GENERAL} vs {CONTROL}"]["hungarian"] = None
    paths = R.write_report(res, tmp_path)
    md = paths["report_md"].read_text()
    assert "n/a" in md
    assert "comparison is incomplete" in json.loads(paths["results_json"].read_text())["answer"][0]


def test_three_domains_and_rerender(tmp_path):
    res = synthetic_results(domains=("chat", "code", "prose"))
    paths = R.write_report(res, tmp_path / "a")
    again = R.render_from_json(paths["results_json"], tmp_path / "b")
    assert again["report_md"].read_text() == paths["report_md"].read_text()
    assert "on prose," in json.loads(paths["results_json"].read_text())["answer"][0]


def test_check_results_names_what_is_missing(tmp_path):
    res = synthetic_results()
    del res["budgets"]
    with pytest.raises(R.ReportError, match="budgets"):
        R.write_report(res, tmp_path)


def test_text_from_data_is_escaped_in_markdown_and_html(tmp_path):
    """Prompts, generations, example contexts, dataset specs and labels come from data or users: a ``<script>``
    in any of them must reach report.md / report.html as inert text, and table rows keep their column count."""
    evil = "<script>alert(1)</script>"
    res = synthetic_results()
    res["config"]["domains"]["code"] = f"code{evil}"
    res["directions"]["example_prompts"] = [[f"Write {evil}"], [f"hi *there* {evil}"]]
    res["directions"]["labels"] = [f"code {evil}", "small talk"]
    res["steering"]["prompts"] = [f"p1 {evil}", "p2"]
    gens = res["steering"]["add"]["generations"]
    gens["clean"] = [f"hello {evil}", "hi | there"]
    res["overlap"]["domain_specific"]["chat"]["top"][0]["examples"][0]["token"] = evil
    paths = R.write_report(res, tmp_path)
    md, html = paths["report_md"].read_text(), paths["report_html"].read_text()
    # a fenced code block (the config as JSON) is inert by construction and holds the text verbatim
    fenced = re.findall(r"^(`{3,})\n(.*?)\n\1$", md, flags=re.S | re.M)
    assert any(evil in body for _, body in fenced)
    md = re.sub(r"^(`{3,})\n.*?\n\1$", "", md, flags=re.S | re.M)
    assert "<script>" not in md and "<script>" not in html
    # escaped, not dropped: every place shows the text
    assert md.count("&lt;script&gt;") >= 6 and html.count("&lt;script&gt;") >= 6
    assert "hi \\*there\\*" in md  # Markdown emphasis from data is inert
    header = next(ln for ln in md.splitlines() if ln.startswith("| direction added |"))
    clean_rows = [ln for ln in md.splitlines() if ln.startswith("| none (clean) |")]
    assert clean_rows and all(ln.replace("\\|", "").count(" | ") == header.count(" | ") for ln in clean_rows)


def test_document_renderers_escape_every_block_kind(tmp_path):
    from domain_sae.study.document import Bullets, Code, Heading, Paragraph, Table, render_html, render_markdown
    evil = "<b>x</b> **y** [z](http://e)"
    blocks = [Heading(evil, 1), Paragraph(evil), Paragraph(evil, strong=True), Bullets([evil]),
              Table([evil], [[evil]]), Code("```\n" + evil)]
    md, html = render_markdown(blocks, {}), render_html(blocks, {})
    prose, code = md.split("````\n", 1)
    assert "<b>x" not in prose and "](http" not in prose.replace("\\](http", "")
    assert "\\*\\*y\\*\\*" in prose
    assert prose.count("&lt;b&gt;") == 6  # heading, 2 paragraphs, bullet, header, cell; code stays verbatim
    assert "````\n```\n<b>x</b>" in md
    assert "<b>x</b>" not in html and html.count("&lt;b&gt;x&lt;/b&gt;") == 7
