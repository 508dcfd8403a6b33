"""The whole study end to end on a tiny random Llama (real SmolLM2 tokenizer, built-in chat/code corpora): every
stage runs, the results hold what the report promises, and the files are written."""

from __future__ import annotations

import json

import pytest
import torch

from domain_sae.study.config import CONTROL, GENERAL, StudyConfig, finetuned_name, scratch_name
from domain_sae.study.run import run_study


def tiny_study_config(out, **kw) -> StudyConfig:
    values = dict(model="tiny-llama", hook="blocks.0.hook_mlp_out", device="cpu", context_size=32,
                  expansion_factor=2, train_batch_size_tokens=128, buffer_size_tokens=512, general_tokens=512,
                  scratch_tokens=512, finetune_tokens=256, budgets=[128, 256], eval_tokens=64, recon_tokens=128,
                  n_prompts=3, steering_strengths=[1.0], steering_tokens=64, generate_tokens=2,
                  output_dir=str(out))
    values.update(kw)
    return StudyConfig(**values).validate()


@pytest.fixture(scope="module")
def tiny_study(smol_tokenizer, tmp_path_factory):
    from conftest import make_tiny_model

    from domain_sae.models.load import LoadedModel
    tiny_lm = LoadedModel(model=make_tiny_model("llama"), tokenizer=smol_tokenizer, name="tiny-llama",
                          source="in-process", family="llama")
    out = tmp_path_factory.mktemp("study")
    logs: list[str] = []
    results = run_study(tiny_study_config(out), out, lm=tiny_lm, log=logs.append, measure=False)
    return results, out, logs


def test_study_end_to_end_on_tiny_model(tiny_study):
    res, out, logs = tiny_study
    names = [GENERAL, CONTROL, scratch_name("chat"), scratch_name("code"), finetuned_name("chat"),
             finetuned_name("code")]
    # files
    for f in ("results.json", "report.md", "report.html", "token_efficiency.png", "steering.png"):
        assert (out / f).is_file(), f
    assert not (out / "cache").exists()  # activation caches are removed after the study
    stored = json.loads((out / "results.json").read_text())
    assert stored["answer"][0].startswith("Bottom line:")
    assert stored["schema_version"] == 1
    # matrix: every SAE on every held-out set, with the LM and reconstruction metrics
    assert list(stored["matrix"]) == names
    for n in names:
        assert set(stored["matrix"][n]) == {GENERAL, "chat", "code"}
        cell = stored["matrix"][n]["chat"]
        assert "metrics/ce_loss_score" in cell and "metrics/explained_variance" in cell
    # the same clean pass serves every SAE: clean CE identical across SAEs on a set
    clean = {stored["matrix"][n]["code"]["metrics/ce_loss_without_sae"] for n in names}
    assert len(clean) == 1
    # fine-tuned SAEs carry their lineage (parent tokens before, after)
    lin = stored["saes"][finetuned_name("code")]["lineage"]
    assert lin["tokens_before"] == 512 and lin["tokens_after"] == 512 + 256
    # token-efficiency curves: one point per budget, scratch and fine-tuned
    for d in ("chat", "code"):
        c = stored["budgets"][d]
        assert c["tokens"] == [128, 256] and len(c["scratch"]) == len(c["finetuned"]) == 2
    # overlap: seed control pair present, drift of every fine-tuned SAE
    assert f"{GENERAL} vs {CONTROL}" in stored["overlap"]["pairs"]
    assert set(stored["overlap"]["drift"]) == {finetuned_name("chat"), finetuned_name("code")}
    # directions: curves over k for every SAE, k limited by d_sae (64)
    per = stored["directions"]["per_sae"]
    assert set(per) == set(names) and per[GENERAL]["ks"][-1] == 64
    # steering: the chosen code latents, the diff-of-means and random baselines, CE change on both domains
    dirs = stored["steering"]["add"]["ce_change"]
    assert len(dirs) == 4 and "random" in dirs
    assert all(set(v) == {"chat", "code"} for v in dirs.values())
    # stages timed, tokens stated; the plan was printed first
    assert {"load", "caches", "train", "matrix", "budgets", "overlap", "directions", "steering"} <= set(
        stored["stages"])
    assert stored["stages"]["train"]["tokens"]["sae"] == 2 * 512 + 2 * (512 + 256)
    assert logs[0].startswith("Study plan")
    md = (out / "report.md").read_text()
    assert md.startswith("# ") and "## Answer" in md
    assert "tiny-llama" in md and '"general_tokens": 512' in md  # model and config stated


def test_study_saes_are_reloadable(tiny_study):
    from domain_sae.sae.io import load_sae
    res, out, _ = tiny_study
    dirs = sorted(p for p in (out / "saes").iterdir() if p.is_dir())
    assert len(dirs) == 6 + 2 * 2 * 2  # main SAEs + budget ladder (2 domains x 2 budgets x scratch/fine-tuned)
    sae = load_sae(out / "saes" / "general_to_code" / "sae")
    assert sae.cfg.d_sae == 64
    x = torch.randn(4, 32)
    assert sae(x).shape == x.shape
