"""Paired bootstrap over documents, against independent computations: every replicate recomputed by brute force
(the drawn documents' tokens concatenated, metrics from numpy), the paired se against the delete-one-document
jackknife of the per-document difference, the unpaired one against the independent-sum formula (so the paired
interval is shown tighter when documents correlate), the seed level against the plug-in variance of a mean, the
matched-L0 blend against the frontier interpolation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from domain_sae.analysis.errors import AnalysisError
from domain_sae.analysis.docstats import Blend, DocStats, at_l0
from domain_sae.analysis.paired import (paired_bootstrap, paired_gap_closed, paired_replicates,
                                        smallest_resolvable_difference)
from domain_sae.analysis.stats import ExtrapolationError, Frontier, gap_closed, jackknife_ratio_se
from domain_sae.evaluation.lm_metrics import CLEAN, ZERO, Condition
from domain_sae.evaluation.uncertainty import DocumentSums, SumKey, bootstrap_weights, reconstruction_token_stats

G = "overall"


def _tokens(n_docs=150, seed=0, shift=0.05, shared=0.6, labels=("A", "B"), d=6):
    """Synthetic held-out tokens: per-token CE (clean, zero ablation, one per SAE), KL, activations and
    reconstructions. ``shared``: how strongly a document's difficulty moves every SAE's CE alike (the correlation
    pairing exploits); SAE number i is ``i * shift`` nats worse than SAE 0 on average."""
    rng = np.random.default_rng(seed)
    doc = np.repeat(np.arange(n_docs), rng.integers(4, 30, n_docs))
    n = doc.size
    u, v = rng.normal(size=n_docs)[doc], rng.normal(size=n_docs)[doc]
    clean = 2.0 + 0.5 * u + 0.3 * rng.normal(size=n)
    zero = clean + 3.0 + 0.5 * v + 0.4 * rng.normal(size=n)
    centre = rng.normal(size=(n_docs, d))[doc]
    x = centre + rng.normal(size=(n, d))
    t = {"doc": doc, "clean": clean, "zero": zero, "x": x, "sae": {}, "xh": {}, "kl": {}}
    kl_base = np.abs(0.3 + shared * 0.5 * v + 0.1 * rng.normal(size=n))
    t["kl_zero"] = kl_base + 2.0
    for i, lab in enumerate(labels):
        t["sae"][lab] = clean + 0.6 + i * shift + shared * v + 0.05 * rng.normal(size=n)
        t["kl"][lab] = kl_base + i * shift
        t["xh"][lab] = (0.9 - 0.02 * i) * x + 0.3 * centre * shared + 0.1 * rng.normal(size=(n, d))
    return t


def _stats(t, label, doc_ids=None) -> DocStats:
    """The evaluation's per-document sums of one pass (all SAEs' CE in one DocumentSums, one extra cluster for
    BOS/padding, as in lm_metrics) turned into DocStats."""
    n_docs = int(t["doc"].max()) + 1
    doc = torch.as_tensor(t["doc"])
    lm = DocumentSums(n_docs + 1)
    lm.add(SumKey(G, "n"), torch.ones(doc.shape[0]), doc)
    lm.add(SumKey(G, "ce", CLEAN), torch.as_tensor(t["clean"]), doc)
    lm.add(SumKey(G, "ce", ZERO), torch.as_tensor(t["zero"]), doc)
    lm.add(SumKey(G, "kl", ZERO), torch.as_tensor(t["kl_zero"]), doc)
    for lab in t["sae"]:
        lm.add(SumKey(G, "ce", Condition("sae", lab)), torch.as_tensor(t["sae"][lab]), doc)
        lm.add(SumKey(G, "kl", Condition("sae", lab)), torch.as_tensor(t["kl"][lab]), doc)
    rec = DocumentSums(n_docs + 1)
    x, xh = torch.as_tensor(t["x"]), torch.as_tensor(t["xh"][label])
    f = torch.relu(xh @ torch.ones(xh.shape[1], 4, dtype=torch.float64))
    for k, v in reconstruction_token_stats(x, xh, f, x.mean(0), fires=False).items():
        rec.add(SumKey(G, k), v, doc)
    ids = np.arange(n_docs) * 7 + 3 if doc_ids is None else doc_ids
    return DocStats.from_evaluation(lm.sums, rec.sums, doc_ids=ids, sae=Condition("sae", label))


def _brute(t, label, idx, metric):
    """The metric on the tokens at ``idx`` (the drawn documents' tokens, repeats included), from numpy."""
    if metric == "metrics/ce_loss_score":
        c, z, s = (t["clean"][idx].mean(), t["zero"][idx].mean(), t["sae"][label][idx].mean())
        return (z - s) / (z - c)
    if metric == "metrics/kl_div_score":
        z, s = t["kl_zero"][idx].mean(), t["kl"][label][idx].mean()
        return (z - s) / z
    x, xh = t["x"][idx], t["xh"][label][idx]
    return 1 - ((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()


@pytest.fixture(scope="module")
def data():
    t = _tokens()
    return t, _stats(t, "A"), _stats(t, "B")


@pytest.mark.parametrize("metric", ["metrics/ce_loss_score", "metrics/explained_variance", "metrics/kl_div_score"])
def test_replicates_match_brute_force_resampling(data, metric):
    t, a, b = data
    n_boot, seed = 40, 3
    diff, reps = paired_replicates(a, b, metric, n_boot=n_boot, seed=seed)
    every = np.arange(t["doc"].size)
    assert diff == pytest.approx(_brute(t, "A", every, metric) - _brute(t, "B", every, metric), rel=1e-10)
    by_doc = [np.flatnonzero(t["doc"] == d) for d in range(a.n_docs)]
    for r, w in enumerate(bootstrap_weights(a.n_docs, n_boot, seed).numpy().astype(int)):
        drawn = np.repeat(np.arange(a.n_docs), w)                  # the documents of replicate r, with repeats
        idx = np.concatenate([by_doc[d] for d in drawn])
        assert reps[r] == pytest.approx(_brute(t, "A", idx, metric) - _brute(t, "B", idx, metric), rel=1e-9)


def test_paired_interval_is_tighter_than_unpaired_when_documents_correlate(data):
    t, a, b = data
    paired = paired_bootstrap(a, b, n_boot=4000, seed=1)
    unpaired = paired_bootstrap(a, b, n_boot=4000, seed=1, paired=False)
    assert paired.diff == unpaired.diff and paired.test.startswith("paired bootstrap over 150 documents")
    assert unpaired.test.startswith("unpaired")
    # independent computations from per-document sums: paired = the jackknife of
    # Δ = Σ_d (s_B - s_A) / Σ_d (z - c) (clean and zero are shared, so Δ is one ratio); unpaired = the two scores'
    # jackknife ses added in quadrature, as if measured on different documents
    docs = t["doc"]

    def per_doc(v):
        return np.bincount(docs, weights=v)
    num, den = per_doc(t["sae"]["B"] - t["sae"]["A"]), per_doc(t["zero"] - t["clean"])
    se_pair = jackknife_ratio_se(num, den)
    se_a = jackknife_ratio_se(per_doc(t["zero"] - t["sae"]["A"]), den)
    se_b = jackknife_ratio_se(per_doc(t["zero"] - t["sae"]["B"]), den)
    assert paired.se == pytest.approx(se_pair, rel=0.12)
    assert unpaired.se == pytest.approx(math.hypot(se_a, se_b), rel=0.12)
    assert paired.half_width < 0.3 * unpaired.half_width
    assert paired.is_difference and not unpaired.is_difference         # only pairing resolves this difference
    assert paired.low < paired.diff < paired.high


def test_p_value_interval_and_verdict_from_the_replicates(data):
    t, a, b = data
    res = paired_bootstrap(a, b, "metrics/explained_variance", n_boot=3000, level=0.9, seed=2)
    _, reps = paired_replicates(a, b, "metrics/explained_variance", n_boot=3000, seed=2)
    lo, hi = np.quantile(reps, [0.05, 0.95])
    assert (res.low, res.high) == (pytest.approx(lo), pytest.approx(hi))
    below, above = int((reps <= 0).sum()), int((reps >= 0).sum())
    assert res.p_value == pytest.approx(min(1.0, 2 * min(below + 1, above + 1) / 3001))
    assert res.se == pytest.approx(np.std(reps, ddof=1))
    same = paired_bootstrap(a, a, n_boot=500)
    assert same.diff == 0 and same.low == same.high == 0 and same.p_value == 1 and not same.is_difference
    far = _tokens(shift=1.0)
    clear = paired_bootstrap(_stats(far, "B"), _stats(far, "A"), n_boot=500)
    assert clear.diff < 0 and clear.p_value == pytest.approx(2 / 501) and clear.is_difference
    assert "a difference" in clear.format() and clear.to_dict()["test"] == clear.test


def test_smallest_resolvable_difference_is_the_paired_half_width(data):
    t, a, b = data
    res = paired_bootstrap(a, b, n_boot=4000, seed=5)
    mdd = smallest_resolvable_difference(a, b, n_boot=4000, seed=5)
    assert mdd == pytest.approx((res.high - res.low) / 2)
    docs = t["doc"]
    num = np.bincount(docs, weights=t["sae"]["B"] - t["sae"]["A"])
    den = np.bincount(docs, weights=t["zero"] - t["clean"])
    assert mdd == pytest.approx(1.96 * jackknife_ratio_se(num, den), rel=0.15)


def test_seeds_resampled_before_documents():
    labels = ("A0", "A1", "A2", "B0", "B1", "B2")
    t = _tokens(n_docs=60, shift=0.0, labels=labels)
    offsets = {"A0": 0.0, "A1": 0.3, "A2": -0.1, "B0": 0.5, "B1": 0.2, "B2": 0.35}   # seed-to-seed spread
    for lab, o in offsets.items():
        t["sae"][lab] = t["sae"][lab] + o
    A = [_stats(t, lab) for lab in labels[:3]]
    B = [_stats(t, lab) for lab in labels[3:]]
    every = np.arange(t["doc"].size)
    per_seed = {lab: _brute(t, lab, every, "metrics/ce_loss_score") for lab in labels}
    hier = paired_bootstrap(A, B, n_boot=8000, seed=0)
    assert hier.diff == pytest.approx(np.mean([per_seed[x] for x in labels[:3]])
                                      - np.mean([per_seed[x] for x in labels[3:]]), rel=1e-10)
    assert hier.test.startswith("paired bootstrap over seeds (3 vs 3), then 60 documents")

    def plug_in(xs):
        return np.var(xs) / len(xs)            # bootstrap variance of a mean of n resampled values
    seed_var = plug_in([per_seed[x] for x in labels[:3]]) + plug_in([per_seed[x] for x in labels[3:]])
    docs_only = paired_bootstrap(A, B, n_boot=8000, seed=0, seeds=False)
    assert docs_only.se < 0.2 * math.sqrt(seed_var)
    assert hier.se ** 2 == pytest.approx(seed_var + docs_only.se ** 2, rel=0.1)
    # seeds that share their start (B_i = A_i + constant) cancel when paired
    C = [_stats({**t, "sae": {"C": t["sae"][lab] + 0.02}, "kl": {"C": t["kl"][lab]}, "xh": {"C": t["xh"][lab]}}, "C")
         for lab in labels[:3]]
    paired_seeds = paired_bootstrap(A, C, n_boot=5000, pair_seeds=True)
    assert paired_seeds.se < 0.2 * paired_bootstrap(A, C, n_boot=5000).se
    assert paired_seeds.is_difference and "seeds (3 vs 3, paired)" in paired_seeds.test
    with pytest.raises(AnalysisError, match="as many seeds in every condition"):
        paired_bootstrap(A, B[:2], pair_seeds=True)


def test_gap_closed_with_one_document_draw_for_all_three():
    t = _tokens(labels=("general", "scratch", "tuned"), shift=-0.1)   # scratch 0.1 nats better than general
    t["sae"]["tuned"] = t["sae"]["tuned"] + 0.13                    # tuned: 0.07 of those 0.1 nats
    g, s, f = (_stats(t, lab) for lab in ("general", "scratch", "tuned"))
    every = np.arange(t["doc"].size)
    vals = {lab: _brute(t, lab, every, "metrics/ce_loss_score") for lab in ("general", "scratch", "tuned")}
    res = paired_gap_closed(g, s, f, n_boot=3000, seed=6)
    assert res.fraction == pytest.approx(gap_closed(vals["general"], vals["scratch"], vals["tuned"]), rel=1e-9)
    assert res.fraction == pytest.approx(0.7, abs=0.1)
    _, fg = paired_replicates(f, g, n_boot=3000, seed=6)              # the same document draws
    _, sg = paired_replicates(s, g, n_boot=3000, seed=6)
    assert (res.low, res.high) == tuple(pytest.approx(q) for q in np.quantile(fg / sg, [0.025, 0.975]))
    assert res.defined and res.gap.is_difference and res.gap.diff == pytest.approx(vals["scratch"] - vals["general"])
    assert res.low < res.fraction < res.high and "%" in res.format()
    flat = paired_gap_closed(g, g, f, n_boot=200)
    assert not flat.defined and flat.format().startswith("undefined")


def test_blend_at_matched_l0_follows_the_frontier():
    t = _tokens(labels=("lo", "hi", "B"))
    runs = [(20.0, _stats(t, "lo")), (80.0, _stats(t, "hi"))]
    blend = at_l0(runs, 40.0)
    every = np.arange(t["doc"].size)
    values = [_brute(t, lab, every, "metrics/ce_loss_score") for lab in ("lo", "hi")]
    expected = Frontier.from_points([20.0, 80.0], values).at(40.0)[0]
    b_value = _brute(t, "B", every, "metrics/ce_loss_score")
    res = paired_bootstrap(blend, _stats(t, "B"), n_boot=200, seed=4)
    assert res.a == pytest.approx(expected, rel=1e-10) and res.diff == pytest.approx(expected - b_value, rel=1e-9)
    _, rep_blend = paired_replicates(blend, _stats(t, "B"), n_boot=200, seed=4)
    _, rep_lo = paired_replicates(runs[0][1], _stats(t, "B"), n_boot=200, seed=4)
    _, rep_hi = paired_replicates(runs[1][1], _stats(t, "B"), n_boot=200, seed=4)
    (c_lo, _), (c_hi, _) = blend.parts
    assert c_lo + c_hi == pytest.approx(1.0) and c_lo == pytest.approx(0.5)   # log 40 is halfway from log 20 to 80
    assert rep_blend == pytest.approx(c_lo * rep_lo + c_hi * rep_hi, rel=1e-9)
    assert isinstance(at_l0(runs, 80.0), Blend) and len(at_l0(runs, 80.0).parts) == 1
    with pytest.raises(ExtrapolationError):
        at_l0(runs, 100.0)


def test_refuses_unpaired_inputs_and_round_trips_to_disk(data, tmp_path):
    t, a, b = data
    other = _stats(t, "B", doc_ids=np.arange(a.n_docs) * 7 + 4)
    with pytest.raises(AnalysisError, match="different held-out documents"):
        paired_bootstrap(a, other)
    fewer = _tokens(seed=0)
    fewer["doc"] = fewer["doc"].copy()
    fewer["doc"][:3] = 1                                             # three tokens moved to another document
    with pytest.raises(AnalysisError, match="different tokens per document"):
        paired_bootstrap(a, _stats(fewer, "B"))
    with pytest.raises(AnalysisError, match="no per-document CE"):
        DocStats.from_evaluation({SumKey(G, "ce", CLEAN): torch.zeros(3)}, None, doc_ids=[0, 1, 2],
                                 sae=Condition("sae", "A"))
    a.save(tmp_path / "a.npz")
    back = DocStats.load(tmp_path / "a.npz")
    assert set(back.sums) == set(a.sums) and all(torch.equal(back.sums[k], a.sums[k]) for k in a.sums)
    assert np.array_equal(back.doc_ids, a.doc_ids)
    assert paired_bootstrap(back, b, n_boot=100) == paired_bootstrap(a, b, n_boot=100)
    # the replicates of a named metric are cached per DocStats and (metric, R, seed); the cache changes nothing
    assert ("metrics/ce_loss_score", 100, 0) in a.replicates and ("metrics/ce_loss_score", 100, 0) in back.replicates
    fresh = DocStats(a.doc_ids, a.sums)
    assert paired_replicates(fresh, b, n_boot=100)[1] == pytest.approx(paired_replicates(a, b, n_boot=100)[1])


def test_from_an_evaluation_point_values_and_replicates_are_the_evaluations():
    """DocStats from evaluate_saes_on_tokens (tiny model, two SAEs, documents spanning sequences): its point metrics
    are the evaluation's, and its bootstrap replicates under the same weights give the evaluation's own error bars."""
    from conftest import make_tiny_model
    from test_eval_lm import HOOK, VOCAB, random_sae

    from domain_sae.analysis.docstats import metric_function, side_values
    from domain_sae.evaluation.lm_metrics import evaluate_saes_on_tokens

    model = make_tiny_model("llama", vocab_size=VOCAB, d_model=32)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (8, 12), generator=g)
    segs = torch.full((8, 12), 1, dtype=torch.int8)
    segs[:, 0] = 0                                                   # BOS (special)
    docs = torch.tensor([[10] * 12, [11] * 6 + [12] * 6, [13] * 12, [12] * 12, [14] * 12, [15] * 12, [16] * 12,
                         [17] * 12])
    docs[:, 0] = -1
    n_boot, seed = 50, 7
    res = evaluate_saes_on_tokens({"a": random_sae(seed=3), "b": random_sae(seed=4)}, model, HOOK, ids, segs,
                                  doc_ids=docs, n_bootstrap=n_boot, bootstrap_seed=seed)
    a, b = DocStats.from_result(res["a"]), DocStats.from_result(res["b"])
    assert a.doc_ids.tolist() == list(range(10, 18))
    for m in ("metrics/ce_loss_score", "metrics/explained_variance", "metrics/kl_div_score"):
        d = paired_bootstrap(a, b, m, n_boot=n_boot, seed=seed)
        assert d.a == pytest.approx(res["a"].metrics[m], rel=1e-9) and d.b == pytest.approx(res["b"].metrics[m],
                                                                                            rel=1e-9)
        fn, group = metric_function(m)
        reps = side_values(a, fn, group, bootstrap_weights(a.n_docs, n_boot, seed)).numpy()
        assert np.std(reps, ddof=1) == pytest.approx(res["a"].errors["overall"][m]["se"], rel=1e-9)
    with pytest.raises(AnalysisError, match="no per-document sums"):
        DocStats.from_result(type(res["a"])(metrics={}))
