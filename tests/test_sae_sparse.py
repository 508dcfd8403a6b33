"""Sparse kernels (sae/sparse.py): values and gradients against the dense computation, gradcheck in float64."""

import pytest
import torch

from domain_sae.sae import sparse as S


def _topk_latents(B=6, n=11, k=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, n, generator=g, dtype=dtype)
    top = z.topk(k, dim=-1, sorted=False)
    return S.from_topk(top.indices, top.values, n), z


def _ragged_latents(B=7, n=9, seed=1, dtype=torch.float64):
    """Variable counts per token, including a token with no entry."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, n, generator=g, dtype=dtype)
    z[2] = -1.0
    lat = S.from_positive(z)
    return lat.with_vals(z[lat.rows, lat.cols]), z


def _dense(lat):
    out = torch.zeros(lat.n_tokens, lat.d_sae, dtype=lat.vals.dtype)
    for r, c, v in zip(lat.rows.tolist(), lat.cols.tolist(), lat.vals.tolist()):
        out[r, c] += v
    return out


@pytest.mark.parametrize("make", [_topk_latents, _ragged_latents])
def test_coordinates_match_brute_force(make):
    lat, _ = make()
    assert torch.equal(lat.to_dense(), _dense(lat))
    assert torch.equal(lat.fired_counts(), (_dense(lat) > 0).sum(0))
    assert torch.all(lat.rows[1:] >= lat.rows[:-1])
    counts = torch.bincount(lat.rows, minlength=lat.n_tokens)
    assert torch.equal(lat.offsets, torch.cumsum(counts, 0) - counts)


@pytest.mark.parametrize("make", [_topk_latents, _ragged_latents])
@pytest.mark.parametrize("method", ["sparse_mm", "index_add"])
def test_decode_gradcheck(make, method, monkeypatch):
    monkeypatch.setattr(S, "SCATTER_METHOD", method)
    lat, _ = make()
    d_in = 5
    W = torch.randn(lat.d_sae, d_in, dtype=torch.float64, requires_grad=True)
    vals = lat.vals.clone().requires_grad_(True)

    def f(v, w):
        return S.SparseDecode.apply(v, lat.rows, lat.cols, lat.offsets, w)
    assert torch.autograd.gradcheck(f, (vals, W))


@pytest.mark.parametrize("make", [_topk_latents, _ragged_latents])
@pytest.mark.parametrize("method", ["sparse_mm", "index_add"])
def test_gather_pre_gradcheck(make, method, monkeypatch):
    monkeypatch.setattr(S, "SCATTER_METHOD", method)
    lat, _ = make()
    d_in = 4
    x = torch.randn(lat.n_tokens, d_in, dtype=torch.float64, requires_grad=True)
    W = torch.randn(d_in, lat.d_sae, dtype=torch.float64, requires_grad=True)
    b = torch.randn(lat.d_sae, dtype=torch.float64, requires_grad=True)

    def f(x_, w_, b_):
        z = (x_ @ w_ + b_).detach()  # recomputed for each perturbation; the gradient comes from the kernel
        return S.gather_pre(lat, x_, w_, b_, z)
    assert torch.autograd.gradcheck(f, (x, W, b))


@pytest.mark.parametrize("make", [_topk_latents, _ragged_latents])
def test_sparse_step_equals_dense_step_values_and_gradients(make):
    """encode-gather -> relu -> decode: loss and all gradients equal the dense products (float32)."""
    lat, _ = make(B=33, n=40, dtype=torch.float32) if make is _ragged_latents else make(B=33, n=40, k=4,
                                                                                          dtype=torch.float32)
    d_in = 8
    g = torch.Generator().manual_seed(5)
    x = torch.randn(lat.n_tokens, d_in, generator=g)
    target = torch.randn(lat.n_tokens, d_in, generator=g)
    params = [torch.randn(d_in, lat.d_sae, generator=g) * 0.3, torch.randn(lat.d_sae, generator=g) * 0.1,
              torch.randn(lat.d_sae, d_in, generator=g) * 0.3]
    mask = _dense(lat.with_vals(torch.ones_like(lat.vals, dtype=torch.float64))) > 0

    def run(sparse: bool):
        W_enc, b_enc, W_dec = (p.clone().requires_grad_(True) for p in params)
        if sparse:
            z = (x @ W_enc + b_enc).detach()
            v = torch.relu(S.gather_pre(lat, x, W_enc, b_enc, z))
            y = S.sparse_decode(lat.with_vals(v), W_dec)
        else:
            f = torch.relu(x @ W_enc + b_enc) * mask
            y = f @ W_dec
        loss = (y - target).pow(2).sum()
        loss.backward()
        return loss.detach(), [p.grad for p in (W_enc, b_enc, W_dec)]

    (ls, gs), (ld, gd) = run(True), run(False)
    torch.testing.assert_close(ls, ld, rtol=1e-5, atol=1e-5)
    for a, b in zip(gs, gd):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_gather_dot_sampled_and_chunked_agree():
    lat, _ = _ragged_latents(B=20, n=13, dtype=torch.float32)
    A, W = torch.randn(20, 6), torch.randn(13, 6)
    want = (A[lat.rows] * W[lat.cols]).sum(-1)
    torch.testing.assert_close(S.gather_dot(lat.rows, lat.cols, A, W, lat.offsets), want)
    torch.testing.assert_close(S.gather_dot(lat.rows, lat.cols, A, W), want)


def test_reference_functions_match_brute_force():
    lat, z = _topk_latents()
    W = torch.randn(lat.d_sae, 3, dtype=torch.float64)
    torch.testing.assert_close(S.reference_decode(lat, W), _dense(lat) @ W)
    torch.testing.assert_close(S.sparse_decode(lat, W), _dense(lat) @ W)
