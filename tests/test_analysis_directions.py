"""Direction capture: diff of means, reconstruction cosine, best latent, top-k least squares and OMP curves."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from domain_sae.analysis import (AnalysisError, best_single_latent, diff_of_means, direction_capture,
                                 mean_activation_difference, omp, omp_curve, reconstruction_cosine,
                                 topk_least_squares_curve)


class ToySAE(torch.nn.Module):
    """ReLU SAE with the parameter layout of the contract (W_enc [d_in, d_sae], W_dec [d_sae, d_in])."""

    def __init__(self, W_enc, b_enc, W_dec, b_dec):
        super().__init__()
        self.W_enc, self.b_enc = torch.nn.Parameter(W_enc), torch.nn.Parameter(b_enc)
        self.W_dec, self.b_dec = torch.nn.Parameter(W_dec), torch.nn.Parameter(b_dec)

    def encode(self, x):
        return torch.relu(x @ self.W_enc + self.b_enc)

    def decode(self, f):
        return f @ self.W_dec + self.b_dec


def _random_sae(d_in=8, d_sae=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ToySAE(torch.randn(d_in, d_sae, generator=g) * 0.5, torch.randn(d_sae, generator=g) * 0.1,
                  torch.randn(d_sae, d_in, generator=g) * 0.3, torch.randn(d_in, generator=g))


def _acts(seed=0, d_in=8):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(50, d_in, generator=g) + torch.linspace(-1, 1, d_in)
    b = torch.randn(70, d_in, generator=g) * 2.0
    return a, b


def test_diff_of_means_vs_numpy():
    a, b = _acts()
    d = diff_of_means(a, b)
    assert d.dtype == torch.float32
    np.testing.assert_allclose(d.numpy(), a.double().numpy().mean(0) - b.double().numpy().mean(0), atol=1e-6)
    with pytest.raises(AnalysisError, match="widths"):
        diff_of_means(a, b[:, :3])
    with pytest.raises(AnalysisError):
        diff_of_means(a[:0], b)


def test_direction_equal_to_a_decoder_row_is_captured_by_one_latent():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(40, 16, generator=g)
    d = 2.5 * W[7]
    assert best_single_latent(W, d)[0] == 7
    assert best_single_latent(W, d)[1] == pytest.approx(1.0, abs=1e-6)
    idx, cos = best_single_latent(W, -d, absolute=True)
    assert idx == 7 and cos == pytest.approx(-1.0, abs=1e-6)
    score = torch.zeros(40)
    score[7] = 1.0
    ks = [1, 2, 5]
    # float32 inputs: 2.5 * W[7] is rounded, so "exact" means float32 precision
    assert topk_least_squares_curve(W, d, score, ks)[0] < 1e-6
    assert omp_curve(W, d, ks)[0] < 1e-6
    assert omp(W, d, 1)[0] == [7]


def test_exactly_sparse_combination_of_three_atoms():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(128, 32, generator=g, dtype=torch.float64)  # float64: the combination is exact
    W = W * (torch.rand(128, 1, generator=g, dtype=torch.float64) + 0.5)  # unequal row norms: OMP must use unit atoms
    support = [3, 10, 20]
    d = 2.0 * W[3] - 1.5 * W[10] + 0.7 * W[20]
    selected, errs = omp(W, d, 5)
    assert sorted(selected[:3]) == support
    assert errs[1] > 1e-3 and errs[2] < 1e-10 and torch.all(errs[3:] == 0)
    sel32, errs32 = omp(W.float(), d.float(), 3)  # the usual float32 decoder: exact up to rounding
    assert sorted(sel32) == support and errs32[2] < 1e-6
    curve = omp_curve(W, d, [1, 2, 3, 4])
    assert curve[2] < 1e-10 and curve[0] > curve[1] > 1e-3
    # top-k least squares with a score that ranks the true atoms first reaches 0 at k = 3 too
    score = torch.rand(128, generator=g)
    score[support] = torch.tensor([5.0, 4.0, 3.0])
    lstsq = topk_least_squares_curve(W, d, score, [1, 2, 3, 10])
    assert lstsq[2] < 1e-10 and lstsq[3] < 1e-10 and lstsq[1] > 1e-3


def test_topk_curve_matches_numpy_lstsq():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(50, 12, generator=g)
    d = torch.randn(12, generator=g)
    score = torch.randn(50, generator=g)
    ks = [1, 4, 9, 12, 20]
    got = topk_least_squares_curve(W, d, score, ks).numpy()
    order = np.argsort(-score.double().numpy(), kind="stable")
    Wn, dn = W.double().numpy(), d.double().numpy()
    for k, e in zip(ks, got):
        A = Wn[order[:k]].T
        c = np.linalg.lstsq(A, dn, rcond=None)[0]
        assert e == pytest.approx(np.linalg.norm(dn - A @ c) / np.linalg.norm(dn), abs=1e-9)
    assert got[-1] < 1e-10  # 20 random atoms span R^12


def test_omp_matches_independent_numpy_omp_and_is_monotone():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(60, 10, generator=g) * (torch.rand(60, 1, generator=g) + 0.2)
    d = torch.randn(10, generator=g)
    sel, errs = omp(W, d, 10)
    Wn, dn = W.double().numpy(), d.double().numpy()
    U = Wn / np.linalg.norm(Wn, axis=1, keepdims=True)
    r, S, ref = dn.copy(), [], []
    for _ in range(10):
        c = np.abs(U @ r)
        c[S] = -1
        S.append(int(c.argmax()))
        coef = np.linalg.lstsq(Wn[S].T, dn, rcond=None)[0]
        r = dn - Wn[S].T @ coef
        ref.append(np.linalg.norm(r) / np.linalg.norm(dn))
    assert sel == S
    np.testing.assert_allclose(errs.numpy(), ref, atol=1e-9)
    assert torch.all(errs[1:] <= errs[:-1] + 1e-12)
    assert torch.allclose(omp_curve(W, d, [2, 5]), errs[[1, 4]])


def test_curve_argument_errors():
    W = torch.randn(6, 4)
    d = torch.randn(4)
    with pytest.raises(AnalysisError, match="out of range"):
        omp_curve(W, d, [0, 3])
    with pytest.raises(AnalysisError, match="out of range"):
        topk_least_squares_curve(W, d, torch.zeros(6), [7])
    with pytest.raises(AnalysisError, match="zero vector"):
        omp_curve(W, torch.zeros(4), [1])
    with pytest.raises(AnalysisError, match="d_in"):
        best_single_latent(W, torch.randn(5))
    with pytest.raises(AnalysisError, match="score"):
        topk_least_squares_curve(W, d, torch.zeros(5), [1])


def test_reconstruction_cosine_both_forms_vs_manual():
    sae = _random_sae()
    a, b = _acts()
    with torch.no_grad():
        def rec(x):
            return sae.decode(sae.encode(x)).double()
        d = a.double().mean(0) - b.double().mean(0)
        set_form = torch.nn.functional.cosine_similarity(d, rec(a).mean(0) - rec(b).mean(0), dim=0).item()
        ma, mb = a.mean(0), b.mean(0)
        mean_form = torch.nn.functional.cosine_similarity(d, rec(ma[None])[0] - rec(mb[None])[0], dim=0).item()
    assert reconstruction_cosine(sae, a, b, batch_size=7) == pytest.approx(set_form, abs=1e-6)
    assert reconstruction_cosine(sae, ma, mb) == pytest.approx(mean_form, abs=1e-6)
    assert set_form != pytest.approx(mean_form, abs=1e-3)  # the two definitions really differ for a ReLU SAE
    with pytest.raises(AnalysisError, match="mean vectors"):
        reconstruction_cosine(sae, ma, b)


def test_reconstruction_cosine_is_one_for_a_lossless_sae():
    d_in = 6
    eye = torch.eye(d_in)
    # f = [relu(x), relu(-x)], x_hat = relu(x) - relu(-x) = x: reconstructs everything exactly
    sae = ToySAE(torch.cat([eye, -eye], 1), torch.zeros(2 * d_in), torch.cat([eye, -eye], 0), torch.zeros(d_in))
    a, b = _acts(5, d_in)
    assert reconstruction_cosine(sae, a, b) == pytest.approx(1.0, abs=1e-9)


def test_mean_activation_difference_vs_manual():
    sae = _random_sae()
    a, b = _acts(6)
    with torch.no_grad():
        ref = sae.encode(a).double().mean(0) - sae.encode(b).double().mean(0)
    got = mean_activation_difference(sae, a, b, batch_size=16)
    assert got.shape == (32,)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-6)


def test_direction_capture_summary():
    sae = _random_sae()
    a, b = _acts(7)
    s = direction_capture(sae, a, b, ks=[1, 2, 4, 8, 64])
    json.dumps(s)
    assert s["ks"] == [1, 2, 4, 8]  # 64 > d_sae dropped
    d = diff_of_means(a, b)
    assert s["direction_norm"] == pytest.approx(float(d.double().norm()), rel=1e-6)
    assert s["best_latent"] == best_single_latent(sae.W_dec, d)[0]
    assert s["omp_rel_error"] == pytest.approx(omp_curve(sae.W_dec, d, [1, 2, 4, 8]).tolist())
    score = mean_activation_difference(sae, a, b)
    assert s["topk_lstsq_rel_error"] == pytest.approx(topk_least_squares_curve(sae.W_dec, d, score, s["ks"]).tolist())
    assert s["omp_rel_error"][-1] < 1e-9  # 8 generic atoms span R^8
    assert s["reconstruction_cosine"] == pytest.approx(reconstruction_cosine(sae, a, b))
