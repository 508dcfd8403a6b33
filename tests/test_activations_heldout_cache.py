"""`dsae cache --split heldout`: the evaluation's held-out sample cached (sequences, doc ids, activations), and
`dsae eval --activations` on it: the same reconstruction metrics as the live evaluation, no model run, and the
refusals (training-split cache, another held-out sample, wrong hook, corrupt files, held-out cache for training)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from domain_sae.runs import single as pipeline
from domain_sae.activations.cache import CacheError
from domain_sae.activations.heldout_cache import open_heldout_cache
from domain_sae.activations.hook_cache import build_cache
from domain_sae.cli import main
from domain_sae.config import EvalConfig
from domain_sae.data.token_stream import heldout_batch
from domain_sae.data.segments import PAD, training_mask
from domain_sae.evaluation import EvalError, HeldoutData, SAESet, eval_matrix
from domain_sae.evaluation.uncertainty import RESAMPLING_BIASED
from domain_sae.models.hooks import capture, resolve_hook
from test_activations_hook_cache import H0, H1, Killed, data_cfg, files, kill_after_two, train_cfg

TOKENS = 640
RECON = ("metrics/explained_variance", "metrics/explained_variance_per_token_mean", "metrics/mse", "metrics/l0",
         "metrics/cossim", "metrics/l2_ratio", "sparsity/dead_fraction", "sparsity/dense_fraction")


@pytest.fixture
def heldout_cache(tmp_path, tiny_lm):
    return build_cache(tiny_lm, [H0, H1], data_cfg(), tmp_path / "hcache", TOKENS, shard_tokens=200,
                       split="heldout")


@pytest.fixture
def sae_dir(tmp_path, tiny_lm):
    return pipeline.train(train_cfg(tmp_path, run_name="s"), lm=tiny_lm, quiet=True).sae_dir


def _eval_cfg(**kw):
    base = dict(model="tiny-llama", data="chat", max_rows=300, model_batch_size=4, eval_tokens=TOKENS, n_bootstrap=20)
    return EvalConfig(**{**base, **kw})


def _from_cache(sae_dir, cache, cfg, out_dir):
    return eval_matrix(SAESet.load([sae_dir]), HeldoutData.cached([cache]), cfg, out_dir=out_dir)


def _check_sample(path, cfg, lm):
    root = json.loads((path / "manifest.json").read_text())
    assert root["complete"] and root["split"] == "heldout"
    sample = heldout_batch(cfg, lm.tokenizer, TOKENS)
    cache = open_heldout_cache(path, H1)
    assert torch.equal(cache.input_ids, sample.input_ids.long())
    assert torch.equal(cache.segments, sample.segments.to(torch.int8))
    assert torch.equal(cache.doc_ids, sample.doc_ids.long())
    assert root["sampling"] == sample.summary()
    # independent recomputation: the model on the sample, padding masked out of attention, at the kept positions
    ids, segs = sample.input_ids, sample.segments
    mask = training_mask(segs, True)
    want = capture(lm.model, resolve_hook(lm.model, H1), ids, attention_mask=(segs != PAD).long())
    got = torch.cat([a for _, a in cache.batches(3)])
    torch.testing.assert_close(got[mask], want[mask], rtol=1e-5, atol=1e-6)
    assert torch.isnan(got[~mask]).all()  # positions the cache does not hold are NaN, never zeros
    assert root["n_tokens"] == int(mask.sum())
    stored = torch.cat([load_file(path / s["files"][H0]["file"])["token_ids"] for s in root["shards"]])
    assert torch.equal(stored.long(), ids[mask])
    return root, segs


def test_heldout_cache_is_the_evaluation_sample(heldout_cache, tiny_lm, tmp_path):
    root, _ = _check_sample(heldout_cache, data_cfg(), tiny_lm)
    assert len(root["shards"]) > 1
    # one document per window: padded windows, so the attention mask matters
    cfg = data_cfg(one_document_per_sequence=True)
    padded = build_cache(tiny_lm, [H0, H1], cfg, tmp_path / "padded", TOKENS, split="heldout")
    _, segs = _check_sample(padded, cfg, tiny_lm)
    assert bool((segs == PAD).any())


def test_killed_heldout_build_resumes_to_identical_files(heldout_cache, tmp_path, tiny_lm):
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        build_cache(tiny_lm, [H0, H1], data_cfg(), out, TOKENS, shard_tokens=200, split="heldout",
                    on_shard=kill_after_two)
    (out / "sequences" / "shard_00002.safetensors.tmp").write_bytes(b"half")
    with pytest.raises(CacheError, match="different options"):  # a train build cannot continue a held-out one
        build_cache(tiny_lm, [H0, H1], data_cfg(), out, TOKENS, shard_tokens=200)
    build_cache(tiny_lm, [H0, H1], data_cfg(), out, TOKENS, shard_tokens=200, split="heldout")
    assert files(out) == files(heldout_cache)


def test_eval_from_cache_equals_the_live_reconstruction_metrics(heldout_cache, sae_dir, tiny_lm, tmp_path):
    live = eval_matrix(SAESet.load([sae_dir]), HeldoutData.live(["chat"]), _eval_cfg(), lm=tiny_lm,
                       out_dir=tmp_path / "live")
    cached = _from_cache(sae_dir, heldout_cache, _eval_cfg(), tmp_path / "cached")
    a, b = live["results"][0], cached["results"][0]
    for key in RECON:
        assert b["metrics"][key] == pytest.approx(a["metrics"][key], rel=1e-5, abs=1e-9), key
        se_a, se_b = a["errors"]["overall"][key]["se"], b["errors"]["overall"][key]["se"]
        if key in RESAMPLING_BIASED:  # no error bar for these counts (evaluation.uncertainty), live or cached
            assert se_a is None and se_b is None, key
        else:
            assert se_b == pytest.approx(se_a, rel=1e-4, abs=1e-9), key
    assert set(b["segments"]) == set(a["segments"])
    for seg in a["segments"]:
        assert b["segments"][seg]["metrics/explained_variance"] == pytest.approx(
            a["segments"][seg]["metrics/explained_variance"], rel=1e-5)
    assert "metrics/ce_loss_score" in a["metrics"] and "metrics/ce_loss_score" not in b["metrics"]
    assert cached["splice"] == "not_spliced" and cached["datasets"]["hcache"]["spec"] == "chat"
    assert "CE / KL columns are empty" in (tmp_path / "cached" / "eval.md").read_text()
    assert (tmp_path / "cached" / "heatmap_explained_variance.png").is_file()
    assert not (tmp_path / "cached" / "heatmap_ce_loss_score.png").exists()


def test_unusable_caches_are_refused(heldout_cache, sae_dir, tiny_lm, tmp_path):
    train = build_cache(tiny_lm, [H1], data_cfg(), tmp_path / "train", 300)
    with pytest.raises(CacheError, match="training split"):
        _from_cache(sae_dir, train, _eval_cfg(), tmp_path / "e1")
    with pytest.raises(CacheError, match="held-out split"):  # and a held-out cache never trains an SAE
        pipeline.train(train_cfg(tmp_path, run_name="t", activations=str(heldout_cache)), lm=tiny_lm)
    with pytest.raises(EvalError, match="holdout_fraction 0.05 \\(config: 0.02\\)"):
        _from_cache(sae_dir, heldout_cache, _eval_cfg(holdout_fraction=0.02), tmp_path / "e2")
    with pytest.raises(EvalError, match="max_rows 300"):
        _from_cache(sae_dir, heldout_cache, _eval_cfg(max_rows=200), tmp_path / "e3")
    with pytest.raises(CacheError, match="not blocks.0.hook_resid_post"):
        _from_cache(sae_dir, heldout_cache, _eval_cfg(hook="blocks.0.hook_resid_post"), tmp_path / "e4")
    seq = heldout_cache / "sequences" / "shard_00001.safetensors"
    data = bytearray(seq.read_bytes())
    data[-3] ^= 0xFF
    seq.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="corrupt"):
        _from_cache(sae_dir, heldout_cache, _eval_cfg(), tmp_path / "e5")
    assert not any((tmp_path / f"e{i}").exists() for i in range(1, 6))


def test_cli_cache_heldout_then_eval(tmp_path, tiny_model_dir, capsys):
    data = ["--model", str(tiny_model_dir), "--data", "chat", "--max-rows", "300", "--context-size", "32"]
    assert main(["train", *data, "--hook", H1, "--training-tokens", "512", "--train-batch-size-tokens", "128",
                 "--buffer-size-tokens", "256", "--eval-every", "0", "--output-dir", str(tmp_path / "runs"),
                 "--run-name", "s"]) == 0
    out = tmp_path / "c"
    assert main(["cache", *data, "--hook", H1, "--tokens", str(TOKENS), "--split", "heldout",
                 "--out", str(out)]) == 0
    assert "dsae eval SAE_DIR --activations" in capsys.readouterr().out
    sae = str(tmp_path / "runs" / "s" / "sae")
    assert main(["eval", sae, "--activations", str(out), "--max-rows", "300", "--n-bootstrap", "5",
                 "--out", str(tmp_path / "ev")]) == 0
    res = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert 0 < res["results"][0]["metrics"]["metrics/l0"] and res["splice"] == "not_spliced"
    assert main(["eval", sae, "--activations", str(out), "--data", "chat", "--out", str(tmp_path / "ev2")]) == 2
    assert "give one of them" in capsys.readouterr().err
    store = tmp_path / "f.sqlite"
    assert main(["features", sae, "--activations", str(out), "--out", str(store)]) == 0
    from domain_sae.features.queries import FeatureStore
    st = FeatureStore(store)
    assert st.meta["provenance"]["activation_caches"] == [str(out)]
    assert st.meta["provenance"]["datasets"][0]["spec"] == "chat"


def test_feature_store_from_the_cache_equals_the_live_one(heldout_cache, tiny_lm, tmp_path, monkeypatch):
    import sqlite3

    from domain_sae.features.build import build_feature_store
    from feature_helpers import make_sae
    meta = {"hook_name": H1, "model_name": "tiny-llama", "context_size": 32, "holdout_fraction": 0.05}
    saes = SAESet.of([make_sae(1, enc_std=3.0, bias=-0.5, metadata=meta)])
    kw = dict(lm=tiny_lm, write=None, cfg=EvalConfig(max_rows=300))
    live = build_feature_store(saes, HeldoutData.live(["chat"]), tmp_path / "live.sqlite", n_tokens=TOKENS, **kw)

    import domain_sae.models.hooks as hooks
    real, shapes = hooks.capture, []

    def recorded(model, hook, ids, *args, **kwargs):
        shapes.append(tuple(ids.shape))
        return real(model, hook, ids, *args, **kwargs)
    monkeypatch.setattr(hooks, "capture", recorded)
    cached = build_feature_store(saes, HeldoutData.cached([heldout_cache]), tmp_path / "cached.sqlite", **kw)

    def rows(path, sql):
        with sqlite3.connect(path) as conn:
            return conn.execute(sql).fetchall()

    assert all(t[-1] != 32 for t in shapes)  # only the width probe ran the model, never the sample's windows
    assert rows(live, "SELECT * FROM datasets") == rows(cached, "SELECT * FROM datasets")
    assert rows(live, "SELECT ds_id, seq, ids, segments FROM sequences") == \
        rows(cached, "SELECT ds_id, seq, ids, segments FROM sequences")
    stats = "SELECT latent, density, n_active, mean_act, max_act FROM latents ORDER BY latent"
    a, b = rows(live, stats), rows(cached, stats)
    assert sum(r[2] for r in a) > 0 and [r[:3] for r in a] == [r[:3] for r in b]
    for ra, rb in zip(a, b):
        assert rb[3:] == pytest.approx(ra[3:], rel=1e-5, abs=1e-6)
    ex = "SELECT latent, scope, kind, rank, ds_id, seq, pos, value FROM examples ORDER BY latent, scope, kind, rank"
    ea, eb = rows(live, ex), rows(cached, ex)
    assert len(ea) > 0 and [r[:7] for r in ea] == [r[:7] for r in eb]
    assert [r[7] for r in eb] == pytest.approx([r[7] for r in ea], rel=1e-5, abs=1e-6)
    with pytest.raises(EvalError, match="both choose the data"):
        HeldoutData(specs=("chat",), caches=(str(heldout_cache),))
    with pytest.raises(EvalError, match="holdout_fraction"):
        build_feature_store(saes, HeldoutData.cached([heldout_cache]), tmp_path / "y.sqlite",
                            **{**kw, "cfg": EvalConfig(max_rows=300, holdout_fraction=0.1)})
