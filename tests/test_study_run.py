"""The study end to end on a tiny random Llama (real SmolLM2 tokenizer, built-in chat/code corpora): the rigorous
config at tiny size (two seeds, a k ladder, matched L0, every analysis), its stored values checked against the saved
SAEs, a finished study rerun without training; and (slow) a study interrupted and resumed, every condition."""

from __future__ import annotations

import json
import re

import pytest

from domain_sae.study import StudyConfig, run_study
from domain_sae.study.runs import eval_sets, main_runs, plan_runs

HOOK = "blocks.1.hook_resid_post"


def tiny_config(out, **kw) -> StudyConfig:
    values = dict(model="tiny-llama", hooks=[HOOK], device="cpu", context_size=32, expansion_factor=2,
                  architecture="topk", sparsity=[2, 4], seeds=[1, 2], control_seed=None,
                  conditions=["general", "scratch", "finetune"], train_batch_size_tokens=128,
                  buffer_size_tokens=512, general_tokens=512, scratch_tokens=512, budgets=[128], eval_tokens=64,
                  recon_tokens=128, n_bootstrap=20, ce_for_budgets=False, probe_tokens=128, probe_ks=[1, 2],
                  n_prompts=3, steering_strengths=[1.0], steering_tokens=64, generate_tokens=2, feature_tokens=64,
                  n_l0_grid=2, output_dir=str(out))
    values.update(kw)
    return StudyConfig(**values).validate()


def tiny_lm_of(tokenizer):
    from conftest import make_tiny_model

    from domain_sae.models.load import LoadedModel
    return LoadedModel(model=make_tiny_model("llama"), tokenizer=tokenizer, name="tiny-llama", source="in-process",
                       family="llama")


def strict_json(path):
    def refuse(x):
        raise ValueError(f"non-finite {x} in {path}")
    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def tiny_study(smol_tokenizer, tmp_path_factory):
    lm = tiny_lm_of(smol_tokenizer)
    out = tmp_path_factory.mktemp("study")
    logs: list[str] = []
    cfg = tiny_config(out)
    results = run_study(cfg, out, lm=lm, log=logs.append)
    return cfg, results, out, logs, lm


def test_rigorous_study_end_to_end_on_tiny_model(tiny_study):
    cfg, res, out, logs, _ = tiny_study
    assert logs[0].startswith("Study plan")
    for f in ("results.json", "report.md", "report.html", "answer.png", f"gap_{HOOK}_chat.png",
              f"steering_{HOOK}.png"):
        assert (out / f).is_file(), f
    assert not (out / "cache").exists()  # the activation caches are removed after the study
    stored = strict_json(out / "results.json")
    assert stored["schema_version"] == 2 and stored["answer"] == res["answer"]
    assert 2 <= len(stored["answer"]) <= 5 and stored["answer"][0].startswith("Fine-tuning the general SAE on 128")
    hook = stored["hooks"][HOOK]
    # every run measured on its sets; the model-pass metrics where wanted (headline budget: every run here)
    for run in plan_runs(cfg):
        m = hook["measurements"][run.dirname("k")]
        assert set(m["recon"]) == set(eval_sets(cfg, run)) == set(m["lm"])
        assert 0 < m["recon"][eval_sets(cfg, run)[0]]["l0"] <= run.sparsity + 1e-6  # TopK: at most k
    for d in ("chat", "code"):
        f = hook["findings"][d]
        assert f["matched"] and set(f["metrics"]) == {"ev", "ce"}
        ev = f["metrics"]["ev"]
        assert ev["l0"] == pytest.approx(4.0, abs=0.05)  # compared at the ladder's middle k
        # measured on the same held-out documents: paired bootstraps (at the matched L0: blends of each ladder)
        assert {x["test"] for x in ev["differences"]} == {"paired"} and len(ev["differences"]) == 3
        assert all("seeds (2 vs 2), then" in x["label"] for x in ev["differences"])
        assert ev["gaps"]["finetune"]["test"] == "paired" and ev["resolvable"]["n"] == 3
        assert [r["budget"] for r in ev["gaps"]["finetune"]["budgets"]] == [128]
        assert [r["budget"] for r in ev["forgetting"]["finetune"]] == [128]
        assert ev["table"]["by_l0"][0]["general"]["n"] == 2  # two seeds per condition
    a = hook["analyses"]
    assert list(a["matrix"]) == list(main_runs(cfg))
    clean = {a["matrix"][n]["code"]["metrics/ce_loss_without_sae"] for n in a["matrix"]}
    assert len(clean) == 1  # one clean pass serves every SAE of a set
    assert "general vs general (seed 2)" in a["overlap"]["pairs"] and set(a["overlap"]["drift"]) == {
        "general→chat", "general→code"}
    assert {d: p["labels"] for d, p in a["probing"].items()} == {"chat": "chat", "code": "code"}
    assert set(a["directions"]["per_sae"]) == set(main_runs(cfg))
    assert len(a["steering"]["add"]["ce_change"]) == 4 and "random" in a["steering"]["add"]["ce_change"]
    assert (out / a["features"]["path"]).is_file()
    md = (out / "report.md").read_text()
    answer = md.split("## Answer", 1)[1].split("\n## ", 1)[0]
    assert "![answer](answer.png)" in answer and len(re.findall(r"\.(?:\s|$)", answer.split("![")[0])) <= 6
    assert md.index("## Answer") < md.index("## Setup") < md.index("## Hook blocks.1.hook\\_resid\\_post")


def test_stored_values_are_those_of_the_saved_saes(tiny_study):
    """Reload every main SAE from its run directory and recompute what results.json holds for it."""
    from domain_sae.analysis.docstats import DocStats, metric_function, side_values
    from domain_sae.evaluation import evaluate_saes_on_tokens
    from domain_sae.sae.io import load_sae
    from domain_sae.study.inputs import StudyInputs
    from domain_sae.study.measure import recon_with_se
    cfg, _, out, _, lm = tiny_study
    stored = strict_json(out / "results.json")["hooks"][HOOK]
    data = StudyInputs(cfg, out / "again", lm, log=lambda _: None).hook_data(HOOK)  # the same held-out sample
    for label, run in main_runs(cfg).items():
        rid = run.dirname("k")
        sae = load_sae(out / HOOK / "saes" / rid / "sae")
        for s, want in stored["measurements"][rid]["recon"].items():
            got = recon_with_se(sae, data.held[s])
            assert got["ev"] == pytest.approx(want["ev"], abs=1e-6) and got["l0"] == pytest.approx(want["l0"])
        h = data.lm_sets["chat"]
        got = evaluate_saes_on_tokens({label: sae}, lm, HOOK, h.ids, h.segments, per_segment=False)[label].metrics
        want = stored["measurements"][rid]["lm"]["chat"]["metrics"]
        docs = DocStats.load(out / HOOK / "measure" / f"{rid}.chat.npz")  # the paired statistics' input
        for key in ("metrics/ce_loss_score", "metrics/kl_div_score", "metrics/explained_variance"):
            assert got[key] == pytest.approx(want[key], abs=1e-5), (label, key)
            assert float(side_values(docs, *metric_function(key), None)) == pytest.approx(want[key], abs=1e-6)


def test_a_finished_study_is_read_back_without_training(tiny_study):
    cfg, res, out, _, lm = tiny_study
    logs: list[str] = []
    again = run_study(cfg, out, lm=lm, log=logs.append)
    assert not any("tokens in" in line or "caching" in line for line in logs)
    assert any("finished earlier" in line for line in logs)
    assert again["answer"] == res["answer"] and again["hooks"] == res["hooks"]


class Stop(Exception):
    pass


@pytest.mark.slow
def test_interrupted_study_resumes_with_the_same_values(smol_tokenizer, tmp_path):
    """Every condition, one seed plus a seed control (the demo's shape). A study stopped after its fifth SAE, run
    again, trains only the rest, reuses the measurements it had, and ends with the values of an uninterrupted one."""
    conditions = ["general", "scratch", "finetune", "finetune_kl", "scratch_budget", "scratch_total", "continue",
                  "residual"]
    kw = dict(architecture="standard", sparsity=[2.0], seeds=[1], control_seed=2, conditions=conditions,
              residual_d_sae=16, residual_tokens=256, analyses=["matrix", "overlap"])
    lm = tiny_lm_of(smol_tokenizer)
    ref = run_study(tiny_config(tmp_path / "ref", **kw), tmp_path / "ref", lm=lm, log=lambda _: None)
    cfg = tiny_config(tmp_path / "b", **kw)
    trained: list[str] = []

    def stop_after_five(line: str) -> None:
        if "tokens in" in line:
            trained.append(line)
            if len(trained) == 5:
                raise Stop
    with pytest.raises(Stop):
        run_study(cfg, tmp_path / "b", lm=lm, log=stop_after_five)
    measured = {p.name: p.read_bytes() for p in (tmp_path / "b" / HOOK / "measure").glob("*.json")}
    assert len(measured) == 4  # the fifth SAE was trained, not yet measured
    logs: list[str] = []
    res = run_study(cfg, tmp_path / "b", lm=lm, log=logs.append)
    assert sum("tokens in" in line for line in logs) == len(plan_runs(cfg)) - 5
    for name, before in measured.items():  # the measurements made before the interruption were kept
        assert json.loads((tmp_path / "b" / HOOK / "measure" / name).read_text())["recon"] == json.loads(before)[
            "recon"]
    for rid, m in ref["hooks"][HOOK]["measurements"].items():
        got = res["hooks"][HOOK]["measurements"][rid]
        for s, r in m["recon"].items():
            assert got["recon"][s]["ev"] == pytest.approx(r["ev"], abs=1e-6), (rid, s)
        for s, r in m["lm"].items():
            assert got["lm"][s]["metrics"]["metrics/ce_loss_score"] == pytest.approx(
                r["metrics"]["metrics/ce_loss_score"], abs=1e-5), (rid, s)
    assert res["answer"] == ref["answer"]
