"""eval_matrix: SAE × dataset evaluation written to eval.json / eval.md / PNGs, grouping by hook, the one
compatibility check and byte-identical reruns. The numbers themselves are checked against independent computations in
test_eval_lm.py; here they must equal evaluate_sae on the same tokens (one code path)."""

from __future__ import annotations

import json
import types

import pytest
import torch

from conftest import make_tiny_model
from domain_sae.config import EvalConfig
from domain_sae.evaluation import EvalCompatibilityError, HeldoutData, SAESet, eval_matrix, evaluate_sae
from domain_sae.models.names import same_model_name
from test_eval_lm import D, VOCAB, identity_sae, random_sae

HOOK0, HOOK1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"


def _with_meta(sae, hook, model_name="tiny-llama", data="chat"):
    d_sae = sae.W_dec.shape[0]
    sae.cfg = types.SimpleNamespace(d_in=D, d_sae=d_sae, architecture="standard",
                                    metadata={"model_name": model_name, "hook_name": hook, "dataset_path": data,
                                              "seed": 7})
    return sae


@pytest.fixture(scope="module")
def lm():
    return types.SimpleNamespace(model=make_tiny_model("llama", vocab_size=VOCAB, d_model=D), tokenizer=None,
                                 name="tiny-llama", source="in-process", family="llama")


@pytest.fixture(scope="module")
def heldout():
    g = torch.Generator().manual_seed(1)
    chat_ids = torch.randint(1, VOCAB, (3, 10), generator=g)
    chat_segs = torch.full((3, 10), 3, dtype=torch.int8)
    chat_segs[:, 0] = 0
    chat_segs[:, 1:3] = 4
    chat_segs[:, 3:6] = 2
    code_ids = torch.randint(1, VOCAB, (2, 10), generator=g)
    code_segs = torch.ones(2, 10, dtype=torch.int8)
    code_segs[:, 0] = 0
    code_segs[1, 8:] = -1
    return {"chat": (chat_ids, chat_segs), "code": (code_ids, code_segs)}


def _cfg(**kw):
    return EvalConfig(model="tiny-llama", model_batch_size=2, n_bootstrap=50, **kw)


def _run(lm, heldout, out_dir, saes, hook=None, **kw):
    return eval_matrix(SAESet.of(list(saes.values()), [f"runs/{name}/sae" for name in saes]),
                       HeldoutData.live(["chat", "code"], given=heldout), _cfg(hook=hook, **kw), lm=lm,
                       out_dir=out_dir)


def test_matrix_files_values_and_determinism(lm, heldout, tmp_path):
    saes = {"a": _with_meta(random_sae(seed=1), HOOK0), "b": _with_meta(identity_sae(), HOOK0),
            "c": _with_meta(random_sae(seed=2), HOOK1, data="code")}
    summary = _run(lm, heldout, tmp_path / "one", saes, mean_ablation=True)
    _run(lm, heldout, tmp_path / "two", saes, mean_ablation=True)
    for name in ["eval.json", "eval.md"]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name

    data = json.loads((tmp_path / "one" / "eval.json").read_text())
    assert data == summary
    assert [(r["sae"], r["dataset"]) for r in data["results"]] == [
        (s, d) for s in ["a", "b", "c"] for d in ["chat", "code"]]  # a run's SAE is named after its run
    assert data["hooks"] == [HOOK0, HOOK1]
    assert data["model"]["name"] == "tiny-llama"
    assert set(data["versions"]) >= {"torch", "transformers", "domain-sae"}
    assert data["seeds"]["sae_training_seeds"]["a"] == 7
    assert data["config"]["eval_tokens"] == 16384 and data["mean_ablation"] is True
    assert data["datasets"]["code"]["tokens"]["tokens/pad"] == 2

    # same numbers as evaluate_sae on the same tokens (the trainer's code path), at each SAE's own hook
    for row in data["results"]:
        sae = saes[row["sae"]]
        ids, segs = heldout[row["dataset"]]
        ref = evaluate_sae(sae, lm, row["hook"], ids, segs, batch_size=2, mean_ablation=True)
        for key in ["metrics/ce_loss_score", "metrics/kl_div_with_sae", "metrics/explained_variance",
                    "metrics/l0", "metrics/ce_loss_with_mean_ablation", "tokens/lm_counted"]:
            assert row["metrics"][key] == pytest.approx(ref[key], rel=1e-12, nan_ok=True), key
    b_chat = next(r for r in data["results"] if r["sae"] == "b" and r["dataset"] == "chat")
    assert b_chat["metrics"]["metrics/ce_loss_score"] == 1.0
    assert set(b_chat["segments"]) == {"user", "assistant", "template", "all_tokens"}
    hist = b_chat["log10_density_histogram"]
    assert len(hist["bin_edges"]) == len(hist["counts"]) + 1 and sum(hist["counts"]) == 2 * D

    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    for stem in ["ce_loss_score", "delta_loss", "kl_div_score", "explained_variance", "l0", "dead_fraction"]:
        assert f"heatmap_{stem}.png" in files
    assert sum(f.startswith("density_") for f in files) == 2
    md = (tmp_path / "one" / "eval.md").read_text()
    assert "| a | chat |" in md and "Per segment: chat" in md and "template" in md
    assert "Per segment: `code`" not in md  # one segment only: no breakdown table
    assert "Mean ablation" in md and "Mean-ablation baseline" in md


def test_incompatible_saes_are_refused(lm, heldout, tmp_path):
    with pytest.raises(EvalCompatibilityError, match="trained on model 'gpt2'"):
        _run(lm, heldout, tmp_path, {"x": _with_meta(random_sae(), HOOK0, model_name="gpt2")})
    wide = random_sae(d=16)
    wide.cfg = types.SimpleNamespace(d_in=16, d_sae=64, architecture="standard",
                                     metadata={"model_name": "tiny-llama", "hook_name": HOOK0})
    with pytest.raises(EvalCompatibilityError, match="d_in=16"):
        _run(lm, heldout, tmp_path, {"x": wide})
    with pytest.raises(EvalCompatibilityError, match="--hook"):
        _run(lm, heldout, tmp_path, {"x": _with_meta(random_sae(), HOOK0)}, hook=HOOK1)
    # allowed explicitly
    out = eval_matrix(SAESet.of([_with_meta(random_sae(), HOOK0, model_name="gpt2")], ["x"]),
                      HeldoutData.live(["code"], given=heldout), _cfg(), lm=lm, out_dir=tmp_path / "ok",
                      allow_model_mismatch=True)
    assert len(out["results"]) == 1


def test_same_model_name():
    assert same_model_name("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct")
    assert same_model_name("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct")
    assert same_model_name("openai-community/gpt2", "gpt2")
    assert not same_model_name("gpt2", "gpt2-medium")
    assert not same_model_name(None, "gpt2")


def test_matrix_without_out_dir_writes_nothing_and_gives_the_same_rows(lm, heldout, tmp_path, monkeypatch):
    """The study's form: eval_matrix(SAESet, HeldoutData, cfg) returns eval.json's structure without any file."""
    saes = {"a": _with_meta(random_sae(seed=1), HOOK0)}
    written = _run(lm, heldout, tmp_path / "w", saes)
    monkeypatch.chdir(tmp_path)
    bare = eval_matrix(SAESet.of(list(saes.values()), ["runs/a/sae"]),
                       HeldoutData.live(["chat", "code"], given=heldout), _cfg(), lm=lm)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"] and bare["files"] == {}
    assert bare["results"] == written["results"] and bare["saes"] == written["saes"]
