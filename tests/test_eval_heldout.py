"""Held-out options from the SAEs' metadata, inside the evaluation API: the intersection of the SAEs' held-out
splits (every evaluated document has a hash below every SAE's holdout_fraction, recomputed with hashlib), refusals
when it is empty or a larger fraction is asked for, context-size and prepend_bos disagreements, and `dsae eval`
giving the same eval.json as a Python caller of eval_matrix that passes no held-out option."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types

import pytest
import torch

from domain_sae import cli
from domain_sae.config import EvalConfig, TrainConfig
from domain_sae.data.token_stream import heldout_batch
from domain_sae.evaluation import EvalError, HeldoutData, SAESet, eval_matrix, resolve_eval_config
from domain_sae.evaluation import matrix
from domain_sae.runs.single import new_sae

HOOK = "blocks.0.hook_resid_post"


def _meta_sae(**meta):
    return types.SimpleNamespace(cfg=types.SimpleNamespace(metadata=meta))


def _score(text: str) -> float:
    digest = hashlib.blake2b(b"text\0" + " ".join(text.split()).encode(), digest_size=16).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def test_intersection_rules():
    saes = [_meta_sae(holdout_fraction=0.3, context_size=64, prepend_bos=True, model_name="m"),
            _meta_sae(holdout_fraction=0.1, context_size=64, prepend_bos=True)]
    cfg, record = resolve_eval_config(EvalConfig(), saes, ["a", "b"])
    assert (cfg.holdout_fraction, cfg.context_size, cfg.prepend_bos, cfg.model) == (0.1, 64, True, "m")
    assert record["trained"]["a"]["holdout_fraction"] == 0.3
    assert resolve_eval_config(EvalConfig(holdout_fraction=0.05), saes, ["a", "b"])[0].holdout_fraction == 0.05
    with pytest.raises(EvalError, match=r"training documents of b: 0.1"):
        resolve_eval_config(EvalConfig(holdout_fraction=0.2), saes, ["a", "b"])
    with pytest.raises(EvalError, match="No document is held out for every SAE: c"):
        resolve_eval_config(EvalConfig(), saes + [_meta_sae(holdout_fraction=0.0)], ["a", "b", "c"])
    # SAEs without a recorded fraction (SAELens's) do not constrain; none at all -> the data default
    assert resolve_eval_config(EvalConfig(), [_meta_sae()], ["x"])[0].holdout_fraction == 0.05


def test_context_size_and_prepend_bos_disagreements():
    saes = [_meta_sae(context_size=128), _meta_sae(context_size=64)]
    with pytest.warns(UserWarning, match="different context sizes .*a: 128, b: 64.*smallest, 64"):
        assert resolve_eval_config(EvalConfig(), saes, ["a", "b"])[0].context_size == 64
    with pytest.warns(UserWarning, match="longer than some SAEs were trained at .*b: 64"):
        assert resolve_eval_config(EvalConfig(context_size=128), saes, ["a", "b"])[0].context_size == 128
    mixed = [_meta_sae(prepend_bos=True), _meta_sae(prepend_bos=False)]
    with pytest.raises(EvalError, match="different prepend_bos"):
        resolve_eval_config(EvalConfig(), mixed, ["a", "b"])
    assert resolve_eval_config(EvalConfig(prepend_bos=False), mixed, ["a", "b"])[0].prepend_bos is False


def _corpus(tmp_path):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    texts = [f"Note {i}: " + " ".join(words[(i * 3 + j) % 10] for j in range(8 + i % 7)) for i in range(300)]
    path = tmp_path / "notes.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return texts, str(path)


def _save(path, seed, fraction):
    cfg = TrainConfig(model="tiny-llama", hook=HOOK, d_sae=64, normalize_activations="none")
    meta = {"model_name": "tiny-llama", "hook_name": HOOK, "context_size": 16, "prepend_bos": True,
            "dataset_path": "notes", "holdout_fraction": fraction, "exclude_special_tokens": True, "seed": seed}
    sae = new_sae(cfg, 32, meta)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    sae.save(path)
    return str(path)


def test_only_documents_held_out_for_every_sae_are_evaluated(tmp_path, tiny_lm):
    texts, spec = _corpus(tmp_path)
    dirs = [_save(tmp_path / "wide", 1, 0.4), _save(tmp_path / "narrow", 2, 0.15)]
    cfg = EvalConfig(eval_tokens=96, heldout_tokens_per_document=8, n_bootstrap=10)
    out = eval_matrix(SAESet.load(dirs), HeldoutData.live([spec]), cfg, lm=tiny_lm, out_dir=tmp_path / "eval")
    assert out["heldout"]["holdout_fraction"] == 0.15 and out["config"]["context_size"] == 16
    resolved = EvalConfig(**{k: out["config"][k] for k in out["config"]})
    sample = heldout_batch(dataclasses.replace(resolved, data=spec), tiny_lm.tokenizer, resolved.eval_tokens)
    by_digest = {hashlib.blake2b(b"text\0" + " ".join(t.split()).encode(), digest_size=16).hexdigest(): t
                 for t in texts}
    used = [by_digest[d] for d in sample.documents]
    assert len(used) == next(iter(out["datasets"].values()))["sampling"]["documents"] > 5
    assert all(_score(t) < 0.15 for t in used)  # held out for both SAEs
    assert sample.heldout_documents == sum(_score(t) < 0.15 for t in texts)
    assert all(r["splice"] == "training_mask" for r in out["results"])


def test_cli_and_python_caller_agree(tmp_path, tiny_lm, monkeypatch):
    _, spec = _corpus(tmp_path)
    dirs = [_save(tmp_path / "a", 1, 0.3), _save(tmp_path / "b", 2, 0.2)]
    monkeypatch.setattr(matrix, "_load_lm", lambda cfg: tiny_lm)
    code = cli.main(["eval", *dirs, "--data", spec, "--tokens", "64", "--n-bootstrap", "10",
                     "--heldout-tokens-per-document", "8", "--out", str(tmp_path / "cli")])
    assert code == 0
    py = eval_matrix(SAESet.load(dirs), HeldoutData.live([spec]),
                     EvalConfig(eval_tokens=64, n_bootstrap=10, heldout_tokens_per_document=8), lm=tiny_lm,
                     out_dir=tmp_path / "py")
    from_cli = json.loads((tmp_path / "cli" / "eval.json").read_text())
    assert from_cli["config"] == py["config"] and from_cli["heldout"] == py["heldout"]
    assert from_cli["results"] == py["results"]
    assert py["config"]["holdout_fraction"] == 0.2
    assert (tmp_path / "cli" / "eval.md").read_text() == (tmp_path / "py" / "eval.md").read_text()


def test_eval_help_lists_the_new_options(capsys):
    assert cli.main(["eval", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--splice-all-positions", "--n-bootstrap", "--heldout-tokens-per-document", "--holdout-fraction",
                 "--context-size", "--deduplicate"):
        assert flag in text
