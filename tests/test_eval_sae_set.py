"""The front door of SAEs × held-out data: SAESet (one labelling rule, hooks, grouping by hook and training mask, the
one compatibility check), HeldoutData (live or cached, chosen once), the typed keys of the metric sums, and the same
one-paragraph refusal of a mismatched SAE by `dsae eval`, `dsae eval --activations` and `dsae features`."""

from __future__ import annotations

import pytest
import torch

from domain_sae.activations.hook_cache import build_cache
from domain_sae.config import EvalConfig
from domain_sae.data.sampling import HeldoutSample
from domain_sae.evaluation import EvalCompatibilityError, EvalError, HeldoutData, SAESet
from domain_sae.evaluation.metrics import ReconstructionAccumulator
from domain_sae.evaluation.sae_set import sae_labels
from domain_sae.evaluation.uncertainty import DocumentSums, SumKey, reconstruction_from_totals, \
    reconstruction_token_stats
from domain_sae.sae.model_config import SAECompatibilityError
from feature_helpers import HOOK, make_sae
from test_activations_hook_cache import data_cfg
from test_bad_inputs import assert_one_paragraph, run_cli

H1 = "blocks.1.hook_resid_post"


def test_one_labelling_rule(tmp_path):
    assert sae_labels(["runs/a/sae", "runs/b/sae"]) == ["a", "b"]        # a run's SAE is named after its run
    assert sae_labels(["x/general", "y/general"]) == ["x/general", "y/general"]
    assert sae_labels(["p/sae", "p/sae"]) == ["p", "p#2"]
    assert sae_labels(["general", "general_chat"]) == ["general", "general_chat"]
    (tmp_path / "run" / "sae").mkdir(parents=True)
    assert sae_labels([str(tmp_path / "run"), str(tmp_path / "run" / "sae")]) == ["run", "run#2"]
    assert SAESet.of([make_sae(1), make_sae(2)]).labels == ["sae_0", "sae_1"]


def test_hooks_training_masks_and_groups():
    a = make_sae(1)
    b = make_sae(2, metadata={"hook_name": H1})
    c = make_sae(3, metadata={"exclude_special_tokens": False})
    d = make_sae(4, metadata={"hook_name": None})  # names no hook: the data default
    s = SAESet.of([a, b, c, d], ["a", "b", "c", "d"])
    assert [e.hook for e in s] == [HOOK, H1, HOOK, HOOK] and s.hooks == sorted({HOOK, H1})
    groups = s.groups()
    assert list(groups) == [(HOOK, False), (HOOK, True), (H1, True)]
    assert groups[(HOOK, True)] == {"a": a, "d": d} and groups[(HOOK, False)] == {"c": c}
    assert s.groups(default_exclude_special=False)[(HOOK, False)] == {"a": a, "c": c, "d": d}  # a, d: no mask
    moved = s.at_hook(H1)
    assert moved.hook == H1 and [e.hook for e in moved] == [H1] * 4 and s.at_hook(None) is s
    assert s.at(H1) == {"b": b}
    cfg, record = s.heldout_config(EvalConfig())
    assert cfg.context_size == 32 and record["trained"]["a"]["context_size"] == 32
    with pytest.raises(EvalError, match="No SAE given"):
        SAESet.of([])


def test_the_one_compatibility_check():
    s = SAESet.of([make_sae(1), make_sae(2, metadata={"model_name": "gpt2"})], ["ok", "other"])
    widths = {HOOK: 32, H1: 32}
    with pytest.raises(EvalCompatibilityError, match=r"SAE other \(other\) does not fit: .*trained on model 'gpt2' "
                                                     r"but is used with model 'tiny-llama'"):
        s.check(model="tiny-llama", width=widths.__getitem__)
    s.check(model="tiny-llama", width=widths.__getitem__, allow_model_mismatch=True)
    s.check(model=None, width=widths.__getitem__)  # unknown model (e.g. a cache without one): nothing to compare
    with pytest.raises(EvalCompatibilityError, match="d_in=32 does not match .* d_in=64"):
        s.check(model=None, width=lambda h: 64)
    with pytest.raises(EvalCompatibilityError, match=f"trained at hook '{HOOK}' but is used at hook '{H1}'"):
        s.at_hook(H1).check(model=None, width=widths.__getitem__)
    # the one error type: an evaluation error and an SAE compatibility error (what training raises) at once
    assert issubclass(EvalCompatibilityError, SAECompatibilityError) and issubclass(EvalCompatibilityError, EvalError)


def test_heldout_data_is_chosen_once():
    assert HeldoutData.choose(None, None).specs == ("chat", "code")
    assert HeldoutData.choose(["code"], None).specs == ("code",)
    assert HeldoutData.choose(None, ["c1"]).caches == ("c1",) and HeldoutData.choose(None, ["c1"]).from_cache
    with pytest.raises(EvalError, match="both choose the data"):
        HeldoutData.choose(["chat"], ["c1"])
    with pytest.raises(EvalError, match="No dataset given"):
        HeldoutData()
    assert HeldoutData.live(["chat", "chat"]).labels == ["chat#0", "chat#1"]
    assert HeldoutData.live(["a/x.jsonl", "b/x.jsonl"]).labels == ["a/x.jsonl", "b/x.jsonl"]


def test_given_samples_keep_their_documents():
    ids = torch.arange(12).view(2, 6)
    segs = torch.ones(2, 6, dtype=torch.int8)
    docs = torch.tensor([[0, 0, 0, 1, 1, 1], [2, 2, 2, 2, 2, 2]])
    sample = HeldoutSample(ids, segs, docs, ["d0", "d1", "d2"], 3, 10, 0, 6, 0)
    a, b = HeldoutData.live(["x", "y"], given={"x": sample, "y": (ids, segs)}).sets(EvalConfig(eval_tokens=12))
    assert torch.equal(a.doc_ids, docs) and a.sampling == sample.summary() and a.record()["sampling"]["documents"] == 3
    assert b.doc_ids is None and b.sampling is None and b.segments.dtype == torch.int8  # each sequence a document
    assert b.record()["tokens"]["tokens/total"] == 12 and a.model is None and a.caches == {}
    with pytest.raises(EvalError, match="'z' is empty"):
        HeldoutData.live(["z"], given={"z": (torch.zeros(0, 6, dtype=torch.long), torch.zeros(0, 6))}).sets(
            EvalConfig())


def test_typed_sum_keys_give_each_groups_reconstruction_metrics():
    """Two groups in one set of per-document sums, keyed SumKey(group, stat): each group's metrics from the totals
    equal the float64 accumulator's on that group's tokens alone."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 8, generator=g) + 3.0
    x_hat = x + 0.3 * torch.randn(40, 8, generator=g)
    f = torch.relu(torch.randn(40, 16, generator=g))
    docs = torch.arange(40) % 5
    groups = {"overall": torch.arange(40) < 25, "user": torch.arange(40) >= 25}
    sums = DocumentSums(5)
    for name, m in groups.items():
        mean = x[m].double().mean(0)
        for stat, v in reconstruction_token_stats(x[m], x_hat[m], f[m], mean, fires=True).items():
            sums.add(SumKey(name, stat), v, docs[m])
    totals = sums.totals()
    for name, m in groups.items():
        acc = ReconstructionAccumulator(8, 16)
        acc.update(x[m], x_hat[m], f[m])
        want = acc.compute()
        got = reconstruction_from_totals(totals, name)
        for key in ("metrics/explained_variance", "metrics/mse", "metrics/cossim", "metrics/l0",
                    "sparsity/dead_features", "metrics/explained_variance_per_token_mean"):
            assert float(got[key]) == pytest.approx(want[key], rel=1e-9, abs=1e-12), (name, key)


def test_a_mismatched_sae_is_refused_alike_by_all_three_commands(tmp_path, tiny_lm, tiny_model_dir, capsys):
    """An SAE trained on another model: `dsae eval`, `dsae eval --activations` and `dsae features` give the same one
    paragraph of the one check, before anything is written."""
    sae = make_sae(1, metadata={"model_name": "gpt2", "holdout_fraction": 0.05})
    sae.save(tmp_path / "runs" / "g" / "sae")
    sae_dir = str(tmp_path / "runs" / "g" / "sae")
    cache = build_cache(tiny_lm, [HOOK], data_cfg(), tmp_path / "hcache", 128, split="heldout")
    runs = {"eval": ["eval", sae_dir, "--model", tiny_model_dir, "--data", "chat", "--out", tmp_path / "e1"],
            "eval --activations": ["eval", sae_dir, "--activations", cache, "--max-rows", "300",
                                   "--out", tmp_path / "e2"],
            "features": ["features", sae_dir, "--model", tiny_model_dir, "--data", "chat", "--out",
                         tmp_path / "f.sqlite"]}
    for name, argv in runs.items():
        rc, err = run_cli(argv, capsys)
        assert rc == 2, (name, err)
        assert_one_paragraph(err, "SAE g (", "does not fit: SAE was trained on model 'gpt2' but is used with model",
                             "Use --model gpt2")
    assert not any((tmp_path / p).exists() for p in ("e1", "e2", "f.sqlite"))
