"""Dictionary overlap: max cosine, Hungarian matching, drift, domain-specific latents, top examples, summary."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from domain_sae.analysis import (AnalysisError, compare_dictionaries, decoder_drift, domain_specific_latents,
                                 hungarian_match, matched_fraction, max_cosine, top_activating_examples)


def _np_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    return an @ bn.T


class _DecOnly:
    def __init__(self, w):
        self.W_dec = torch.nn.Parameter(w)


def _permuted_copy(d_sae=48, d_in=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_sae, d_in, generator=g)
    perm = torch.randperm(d_sae, generator=g)
    scales = torch.rand(d_sae, 1, generator=g) + 0.5  # norms differ, directions do not
    return w, w[perm] * scales, perm


def test_permuted_copy_is_matched_completely():
    w, wp, perm = _permuted_copy()
    m = hungarian_match(_DecOnly(w), _DecOnly(wp))  # SAE-like objects work too
    inv = torch.argsort(perm)  # B row j holds A row perm[j], so A row i sits at B row inv[i]
    assert torch.equal(m.rows, torch.arange(len(w)))
    assert torch.equal(m.cols, inv)
    assert torch.allclose(m.cosines, torch.ones(len(w)), atol=1e-5)
    assert matched_fraction(m.cosines, 0.99) == 1.0
    for a, b in ((w, wp), (wp, w)):
        v, idx = max_cosine(a, b, return_indices=True, chunk_size=5)
        assert torch.allclose(v, torch.ones(len(w)), atol=1e-5)
    assert torch.equal(max_cosine(w, wp, return_indices=True)[1], inv)


def test_max_cosine_matches_numpy_in_chunks():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(37, 8, generator=g), torch.randn(23, 8, generator=g)
    ref = _np_cos(a.double().numpy(), b.double().numpy())
    for chunk in (1, 7, 1000):
        v, i = max_cosine(a, b, chunk_size=chunk, return_indices=True)
        np.testing.assert_allclose(v.numpy(), ref.max(1), atol=1e-6)
        np.testing.assert_array_equal(i.numpy(), ref.argmax(1))
    np.testing.assert_allclose(max_cosine(b, a).numpy(), ref.max(0), atol=1e-6)


def test_zero_decoder_row_has_cosine_zero():
    a = torch.zeros(2, 4)
    a[1, 0] = 1.0
    b = torch.eye(4)
    assert max_cosine(a, b).tolist() == [0.0, 1.0]


@pytest.mark.parametrize("shape", [(5, 5), (3, 6), (6, 3)])
def test_hungarian_is_optimal_vs_brute_force(shape):
    g = torch.Generator().manual_seed(sum(shape))
    a, b = torch.randn(shape[0], 6, generator=g), torch.randn(shape[1], 6, generator=g)
    c = _np_cos(a.double().numpy(), b.double().numpy())
    n = min(shape)
    if shape[0] <= shape[1]:
        best = max(sum(c[i, j] for i, j in enumerate(p)) for p in itertools.permutations(range(shape[1]), n))
    else:
        best = max(sum(c[i, j] for j, i in enumerate(p)) for p in itertools.permutations(range(shape[0]), n))
    m = hungarian_match(a, b)
    assert len(m.rows) == len(m.cols) == n
    assert len(set(m.rows.tolist())) == n and len(set(m.cols.tolist())) == n
    np.testing.assert_allclose(m.cosines.double().numpy(), c[m.rows.numpy(), m.cols.numpy()], atol=1e-6)
    assert m.cosines.double().sum().item() == pytest.approx(best, abs=1e-5)


def test_matched_fraction():
    assert matched_fraction([0.9, 0.7, 0.69, -1.0], 0.7) == 0.5
    assert matched_fraction(torch.tensor([0.9, 0.8]), 0.7, n_latents=8) == 0.25
    with pytest.raises(AnalysisError):
        matched_fraction([], 0.7)
    with pytest.raises(AnalysisError, match="n_latents"):
        matched_fraction([0.9, 0.8], n_latents=1)


def test_decoder_drift():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(10, 4, generator=g)
    assert torch.allclose(decoder_drift(w, w.clone()), torch.ones(10), atol=1e-6)
    assert torch.allclose(decoder_drift(w, 3.0 * w), torch.ones(10), atol=1e-6)  # norm change is not drift
    init = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    theta = torch.tensor([0.3, 1.2, np.pi / 2])
    final = torch.stack([torch.tensor([np.cos(0.3), np.sin(0.3)]), torch.tensor([-np.sin(1.2), np.cos(1.2)]) * 5,
                         torch.tensor([-1.0, 1.0])]).float()
    assert torch.allclose(decoder_drift(init, final), torch.cos(theta), atol=1e-6)
    with pytest.raises(AnalysisError, match="shapes must match"):
        decoder_drift(w, w[:5])


def test_domain_specific_latents():
    da = torch.tensor([0.1, 0.0, 2e-5, 0.3, 0.0, 5e-6, 0.05])
    db = torch.tensor([0.0, 0.2, 0.0, 0.3, 0.0, 0.0, 1e-6])
    res = domain_specific_latents(da, db, alive_threshold=1e-5)
    assert res.a_only.tolist() == [0, 6, 2]  # sorted by density on A
    assert res.b_only.tolist() == [1]
    strict = domain_specific_latents(da, db, alive_threshold=1e-5, dead_threshold=0.0)
    assert strict.a_only.tolist() == [0, 2]  # latent 6 fired on B (1e-6 > 0), so it is not dead there
    with pytest.raises(AnalysisError):
        domain_specific_latents(da, db[:3])
    with pytest.raises(AnalysisError, match="dead_threshold"):
        domain_specific_latents(da, db, 1e-5, dead_threshold=1e-4)


class _CharTok:
    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(ord("a") + i) for i in ids)


def test_top_activating_examples():
    f = torch.zeros(2, 6)
    f[0, 1], f[1, 5], f[1, 2], f[0, 4] = 3.0, 5.0, 1.0, 3.0
    ids = torch.arange(12).reshape(2, 6)
    ex = top_activating_examples(f, ids, k=3, window_before=2, window_after=1, tokenizer=_CharTok())
    assert [(e["sequence"], e["position"], e["value"]) for e in ex] == [(1, 5, 5.0), (0, 1, 3.0), (0, 4, 3.0)]
    assert ex[0]["context_ids"] == [9, 10, 11] and ex[0]["highlight"] == 2  # clipped at the sequence end
    assert ex[1]["context_ids"] == [0, 1, 2] and ex[1]["highlight"] == 1  # clipped at the start
    assert (ex[1]["prefix"], ex[1]["token"], ex[1]["suffix"]) == ("a", "b", "c")
    # only firing positions: 4 of them, k = 10 gives 4; a mask removes positions
    assert len(top_activating_examples(f, ids, k=10)) == 4
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 5] = False
    assert top_activating_examples(f, ids, k=1, mask=mask)[0]["position"] == 1
    one_d = top_activating_examples(f[1], ids[1], k=1)
    assert one_d[0]["token_id"] == 11 and one_d[0]["sequence"] == 0
    with pytest.raises(AnalysisError):
        top_activating_examples(f, ids[:1], k=1)


def test_compare_dictionaries_summary():
    w, wp, _ = _permuted_copy(d_sae=40, d_in=12, seed=3)
    g = torch.Generator().manual_seed(4)
    other = torch.randn(30, 12, generator=g)
    s = compare_dictionaries(w, wp, threshold=0.7, bins=20)
    json.dumps(s)
    assert s["hungarian"]["matched_fraction"] == 1.0 and s["hungarian"]["n_pairs"] == 40
    assert s["max_cos_a_to_b"]["mean"] == pytest.approx(1.0, abs=1e-5)
    t = compare_dictionaries(w, other, threshold=0.5, bins=20, include_values=True)
    json.dumps(t)
    ref = _np_cos(w.double().numpy(), other.double().numpy())
    assert t["d_sae_a"] == 40 and t["d_sae_b"] == 30
    assert t["max_cos_a_to_b"]["mean"] == pytest.approx(ref.max(1).mean(), abs=1e-6)
    assert t["max_cos_b_to_a"]["mean"] == pytest.approx(ref.max(0).mean(), abs=1e-6)
    assert t["max_cos_a_to_b"]["frac_above_threshold"] == pytest.approx((ref.max(1) >= 0.5).mean())
    assert sum(t["max_cos_a_to_b"]["hist_counts"]) == 40 and len(t["max_cos_a_to_b"]["hist_edges"]) == 21
    counts, _ = np.histogram(ref.max(0), bins=20, range=(-1, 1))
    assert t["max_cos_b_to_a"]["hist_counts"] == counts.tolist()
    assert t["hungarian"]["n_pairs"] == 30
    assert compare_dictionaries(w, other, max_hungarian_latents=10)["hungarian"] is None
    with pytest.raises(AnalysisError, match="d_in"):
        compare_dictionaries(w, torch.randn(5, 3))


def test_permuted_standard_sae_is_matched_completely_and_behaves_the_same():
    from domain_sae.analysis import direction_capture, reconstruction_cosine
    from domain_sae.sae import standard

    cfg = standard.SAEModelConfig(d_in=12, d_sae=36)
    sae, perm_sae = standard.StandardSAE(cfg), standard.StandardSAE(standard.SAEModelConfig(d_in=12, d_sae=36))
    g = torch.Generator().manual_seed(9)
    perm = torch.randperm(36, generator=g)
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        perm_sae.W_enc.copy_(sae.W_enc[:, perm])
        perm_sae.b_enc.copy_(sae.b_enc[perm])
        perm_sae.W_dec.copy_(sae.W_dec[perm])
        perm_sae.b_dec.copy_(sae.b_dec)
    s = compare_dictionaries(sae, perm_sae, threshold=0.99)
    assert s["hungarian"]["matched_fraction"] == 1.0
    assert s["max_cos_a_to_b"]["frac_above_threshold"] == 1.0 and s["max_cos_b_to_a"]["frac_above_threshold"] == 1.0
    assert torch.equal(hungarian_match(sae, perm_sae).cols, torch.argsort(perm))
    a, b = torch.randn(30, 12, generator=g) + 1.0, torch.randn(40, 12, generator=g)
    assert reconstruction_cosine(sae, a, b) == pytest.approx(reconstruction_cosine(perm_sae, a, b), abs=1e-6)
    ca, cb = direction_capture(sae, a, b, ks=[1, 4]), direction_capture(perm_sae, a, b, ks=[1, 4])
    assert perm[cb["best_latent"]] == ca["best_latent"]
    assert cb["omp_rel_error"] == pytest.approx(ca["omp_rel_error"], abs=1e-9)
