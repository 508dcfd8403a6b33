"""Error bars over documents, against independent computations: every replicate of the bootstrap recomputed by
brute force (tokens of each document weighted by how often it was drawn, metrics from our own forward hook and
numpy), and the bootstrap standard error of a plain mean against the closed-form cluster (ratio-estimator)
standard error."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from domain_sae.evaluation import evaluate_sae
from domain_sae.evaluation.uncertainty import (NO_INTERVAL_REASON, RESAMPLING_BIASED, DocumentSums,
                                              bootstrap_weights, error_bars)
from test_eval_lm import HOOK, PAD, SPECIAL, VOCAB, _content, _counted, _run, _trained, random_sae

B, SEED = 40, 5


@pytest.fixture(scope="module")
def model():
    from conftest import make_tiny_model
    return make_tiny_model("llama", vocab_size=VOCAB, d_model=32)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (5, 14), generator=g)
    segs = torch.full((5, 14), 1, dtype=torch.int8)
    segs[:, 0] = SPECIAL
    segs[2, 10:] = PAD
    segs[0, 1:3] = 4  # template text: counted in all_tokens, not in the headline
    docs = torch.tensor([[0] * 14, [1] * 7 + [2] * 7, [3] * 14, [2] * 14, [4] * 14])
    docs[:, 0] = -1     # inserted BOS
    docs[2, 10:] = -1   # padding
    return ids, segs, docs  # document 2 spans two sequences


def _weighted(values: np.ndarray, w_tok: np.ndarray) -> float:
    return float((w_tok * values).sum() / w_tok.sum())


def test_bootstrap_replicates_match_brute_force(model, batch):
    ids, segs, docs = batch
    sae = random_sae()
    out = evaluate_sae(sae, model, HOOK, ids, segs, batch_size=2, doc_ids=docs, n_bootstrap=B, bootstrap_seed=SEED)
    err = out["errors"]["overall"]
    where = _trained(segs)
    clean, a = _run(model, ids, segs)
    spliced, _ = _run(model, ids, segs, lambda x: torch.where(where[..., None], sae(x), x))
    zero, _ = _run(model, ids, segs, lambda x: torch.where(where[..., None], torch.zeros_like(x), x))

    def per_token_ce(logits):
        return F.cross_entropy(logits[:, :-1].double().reshape(-1, VOCAB), ids[:, 1:].reshape(-1),
                               reduction="none").reshape(ids.shape[0], -1)

    lm_mask = _counted(segs.long()) & _content(segs[:, 1:])
    lm_doc = docs[:, 1:][lm_mask].numpy()
    ce = {k: per_token_ce(v)[lm_mask].numpy() for k, v in [("clean", clean), ("sae", spliced), ("zero", zero)]}
    rec = _trained(segs) & _content(segs)
    x = a[rec].double().numpy()
    with torch.no_grad():
        xh = sae(a[rec]).double().numpy()
        fires = (sae.encode(a[rec]) > 0).numpy()
    rec_doc = docs[rec].numpy()
    weights = bootstrap_weights(5, B, SEED).numpy()  # documents 0..4 are clusters 0..4

    reps = {"metrics/ce_loss_with_sae": [], "metrics/ce_loss_score": [], "metrics/explained_variance": [],
            "metrics/l0": [], "sparsity/dead_features": []}
    for w in weights:
        wl, wr = w[lm_doc], w[rec_doc]
        c = {k: _weighted(v, wl) for k, v in ce.items()}
        reps["metrics/ce_loss_with_sae"].append(c["sae"])
        reps["metrics/ce_loss_score"].append((c["zero"] - c["sae"]) / (c["zero"] - c["clean"]))
        mean = (wr[:, None] * x).sum(0) / wr.sum()
        reps["metrics/explained_variance"].append(
            1 - (wr * ((x - xh) ** 2).sum(1)).sum() / (wr * ((x - mean) ** 2).sum(1)).sum())
        reps["metrics/l0"].append(_weighted(fires.sum(1), wr))
        reps["sparsity/dead_features"].append(float(((wr[:, None] * fires).sum(0) == 0).sum()))
    dead = reps.pop("sparsity/dead_features")
    # the resampling bias behind RESAMPLING_BIASED: no replicate has fewer dead latents than the sample itself
    assert min(dead) >= out["sparsity/dead_features"]
    for key in RESAMPLING_BIASED:
        assert all(math.isnan(err[key][k]) for k in ("se", "ci95_low", "ci95_high")), key
        assert err[key]["no_interval"] == NO_INTERVAL_REASON
    for key, values in reps.items():
        v = np.array(values)
        assert err[key]["se"] == pytest.approx(v.std(ddof=1), rel=1e-6, abs=1e-12), key
        lo, hi = np.quantile(v, [0.025, 0.975])
        assert err[key]["ci95_low"] == pytest.approx(lo, rel=1e-6, abs=1e-12), key
        assert err[key]["ci95_high"] == pytest.approx(hi, rel=1e-6, abs=1e-12), key
    # every reported metric of every group carries an error bar; all_tokens and segments too
    assert set(out["errors"]) == {"overall", "all_tokens", "text", "template"}
    counts = {"metrics/n_tokens", "metrics/explained_variance_per_token_skipped"}  # token counts, not estimates
    assert all(k in err for k in out if k.startswith(("metrics/", "sparsity/")) and k not in counts)


def test_bootstrap_se_of_a_mean_matches_the_cluster_formula():
    g = torch.Generator().manual_seed(0)
    n_docs = 300
    lengths = torch.randint(1, 30, (n_docs,), generator=g)
    doc = torch.repeat_interleave(torch.arange(n_docs), lengths)
    effect = torch.randn(n_docs, generator=g)[doc]  # correlated within documents
    values = effect + 0.5 * torch.randn(doc.shape[0], generator=g, dtype=torch.float32)
    sums = DocumentSums(n_docs)
    sums.add("n", torch.ones_like(values), doc)
    sums.add("s", values, doc)
    t = sums.totals(bootstrap_weights(n_docs, 4000, 1))
    se = error_bars({"mean": t["s"] / t["n"]})["mean"]["se"]
    s_d, n_d = sums.sums["s"].numpy(), sums.sums["n"].numpy()
    m = s_d.sum() / n_d.sum()
    cluster = math.sqrt(((s_d - m * n_d) ** 2).sum()) / n_d.sum()
    assert se == pytest.approx(cluster, rel=0.06)
    naive = float(values.double().std()) / math.sqrt(values.numel())  # tokens as if independent
    assert se > 1.5 * naive


def test_without_doc_ids_each_sequence_is_a_document(model, batch):
    ids, segs, _ = batch
    rows = torch.arange(5)[:, None].expand(5, 14)
    a = evaluate_sae(random_sae(), model, HOOK, ids, segs, n_bootstrap=20, bootstrap_seed=1)
    b = evaluate_sae(random_sae(), model, HOOK, ids, segs, n_bootstrap=20, bootstrap_seed=1, doc_ids=rows)
    assert a["errors"] == b["errors"] and a["tokens/documents"] == 5


def test_dead_latent_replicates_sit_above_the_value_so_no_interval_is_given():
    """568-dead-latents case in miniature: latents that fire in one document each. The brute-force replicate dead
    counts (a latent is dead when none of its documents is drawn) never go below the measured count and their 95%
    percentile interval excludes it; error_bars gives no interval for it but keeps the dense count's."""
    n_docs, d_sae, n_boot = 60, 200, 2000
    g = torch.Generator().manual_seed(4)
    fires = torch.zeros(n_docs, d_sae, dtype=torch.float64)
    fires[torch.arange(150) % n_docs, torch.arange(150)] = 3.0   # latents 0..149 fire in one document each
    fires[:, 150:180] = torch.randint(1, 5, (n_docs, 30), generator=g).double()   # common latents
    n_tok = torch.full((n_docs,), 10.0, dtype=torch.float64)     # latents 180..199 never fire
    w = bootstrap_weights(n_docs, n_boot, 0)
    dead_reps = np.array([int(((wb.numpy()[:, None] * fires.numpy()).sum(0) == 0).sum()) for wb in w])
    value = int((fires.sum(0) == 0).sum())
    assert value == 20 and dead_reps.min() >= value
    lo, hi = np.quantile(dead_reps, [0.025, 0.975])
    assert lo > value                                            # the old "interval" does not contain the value
    dense = ((w @ fires) / (w @ n_tok)[:, None] > 0.1).sum(-1).double()
    bars = error_bars({"sparsity/dead_features": torch.as_tensor(dead_reps, dtype=torch.float64),
                       "sparsity/dense_features": dense})
    assert math.isnan(bars["sparsity/dead_features"]["ci95_low"]) and "no_interval" in bars["sparsity/dead_features"]
    assert bars["sparsity/dense_features"]["se"] == pytest.approx(float(dense.std()), rel=1e-9)
    assert "no_interval" not in bars["sparsity/dense_features"]
