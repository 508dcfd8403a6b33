"""eval_matrix end to end with the real pieces: SAE directories written by StandardSAE.save and read back by
sae.io.load_sae, held-out tokens from data.pipeline.heldout_batch (built-in chat and code), a tiny random Llama
with the real SmolLM2 tokenizer. The numbers must equal evaluate_sae on the same held-out tokens (the trainer's
evaluator path), and an SAE of another model is refused."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from domain_sae.config import DataConfig, EvalConfig, TrainConfig
from domain_sae.data.token_stream import heldout_batch
from domain_sae.evaluation import (EvalCompatibilityError, HeldoutData, SAESet, eval_matrix, evaluate_sae,
                                   resolve_eval_config)
from domain_sae.runs.single import new_sae
from domain_sae.sae.io import load_sae

HOOK = "blocks.0.hook_resid_post"
D = 32


def _save_sae(path, seed, model_name="tiny-llama", data="chat"):
    cfg = TrainConfig(model=model_name, hook=HOOK, data=data, d_sae=64, normalize_activations="none")
    meta = {"model_name": model_name, "hook_name": HOOK, "context_size": 32, "prepend_bos": True,
            "dataset_path": data, "training_tokens": 0, "seed": seed}
    sae = new_sae(cfg, D, meta)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    sae.save(path)
    return path


def _cfg():
    return EvalConfig(model="tiny-llama", hook=HOOK, context_size=32, eval_tokens=192, model_batch_size=4,
                      heldout_tokens_per_document=48, n_bootstrap=100)


def test_eval_matrix_on_saved_saes_and_builtin_heldout(tiny_lm, tmp_path):
    dirs = [_save_sae(tmp_path / "chat_sae", 1), _save_sae(tmp_path / "code_sae", 2, data="code")]
    out = eval_matrix(SAESet.load(dirs), HeldoutData.live(["chat", "code"]), _cfg(), lm=tiny_lm,
                      out_dir=tmp_path / "eval")
    assert json.loads((tmp_path / "eval" / "eval.json").read_text()) == out  # byte-identical reruns: runner tests
    assert len(out["results"]) == 4

    resolved, _ = resolve_eval_config(_cfg(), [load_sae(d) for d in dirs], ["chat_sae", "code_sae"])
    for spec in ["chat", "code"]:
        sample = heldout_batch(dataclasses.replace(resolved, data=spec), tiny_lm.tokenizer, 192)
        ids, segs = sample
        assert out["datasets"][spec]["tokens"]["tokens/total"] == ids.numel()
        assert out["datasets"][spec]["sampling"]["documents"] == sample.n_documents > 1
        ref = evaluate_sae(load_sae(dirs[0]), tiny_lm, HOOK, ids, segs, batch_size=4, doc_ids=sample.doc_ids,
                           n_bootstrap=resolved.n_bootstrap, bootstrap_seed=resolved.seed)
        row = next(r for r in out["results"] if r["sae"] == "chat_sae" and r["dataset"] == spec)
        for key in ["metrics/ce_loss_score", "metrics/ce_loss_with_sae", "metrics/kl_div_with_sae",
                    "metrics/explained_variance", "metrics/l0", "tokens/lm_counted"]:
            assert row["metrics"][key] == pytest.approx(ref[key], rel=1e-12), (spec, key)
            if not key.startswith("tokens/"):
                se = row["errors"]["overall"][key]["se"]
                assert se == pytest.approx(ref["errors"]["overall"][key]["se"], rel=1e-9, nan_ok=True), (spec, key)
        assert row["metrics"]["tokens/lm_counted"] < ids.numel()  # BOS / template markers were excluded
    chat_row = next(r for r in out["results"] if r["dataset"] == "chat")
    assert {"user", "assistant"} <= set(chat_row["segments"])
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["saes"]["code_sae"]["trained_on"] == "code"


def test_sae_of_another_model_is_refused(tiny_lm, tmp_path):
    d = _save_sae(tmp_path / "gpt2_sae", 1, model_name="gpt2")
    with pytest.raises(EvalCompatibilityError, match="gpt2"):
        eval_matrix(SAESet.load([d]), HeldoutData.live(["code"]), _cfg(), lm=tiny_lm, out_dir=tmp_path / "eval")


@pytest.mark.slow
def test_identity_sae_on_the_real_model(smol_lm):
    """On SmolLM2-135M and real held-out chat: an exact reconstruction changes nothing; the clean CE is that of a
    trained model (far below log(vocab) = 10.8 nats)."""
    from test_eval_lm import identity_sae
    cfg = DataConfig(data="chat", context_size=64)
    ids, segs = heldout_batch(cfg, smol_lm.tokenizer, 512)
    out = evaluate_sae(identity_sae(576), smol_lm, "blocks.3.hook_resid_post", ids, segs, batch_size=4,
                       mean_ablation=True)
    assert out["metrics/ce_loss_score"] == 1.0 and out["metrics/kl_div_with_sae"] == 0.0
    assert out["metrics/explained_variance"] == 1.0
    assert 0.5 < out["metrics/ce_loss_without_sae"] < 6.0
    assert out["metrics/ce_loss_with_ablation"] > out["metrics/ce_loss_without_sae"]
    assert {"user", "assistant"} <= set(out["segments"])
