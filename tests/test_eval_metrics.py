"""ReconstructionAccumulator against independent numpy computations of the SPEC section 3 formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from domain_sae.evaluation.metrics import MetricError, ReconstructionAccumulator


def _data(n=300, d=12, k=40, seed=0, offset=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.linspace(0.5, 2.0, d) + offset  # non-zero mean
    x_hat = x + 0.3 * torch.randn(n, d, generator=g) - 0.1
    f = torch.relu(torch.randn(n, k, generator=g) - 1.0)
    f[:, :3] = 0.0                      # three dead latents
    f[:, 3] = 1.0                       # one dense latent
    return x, x_hat, f


def _numpy_reference(x, x_hat, f):
    """Two-pass float64 numpy versions of every formula."""
    x = x.numpy().astype(np.float64)
    xh = x_hat.numpy().astype(np.float64)
    f = f.numpy()
    xbar = x.mean(axis=0)
    e = ((x - xh) ** 2).sum(1)
    v = ((x - xbar) ** 2).sum(1)
    ev_t = 1 - e / v
    nx, nxh = np.linalg.norm(x, axis=1), np.linalg.norm(xh, axis=1)
    p = (f > 0).mean(0)
    return {
        "metrics/explained_variance": 1 - e.sum() / v.sum(),
        "metrics/explained_variance_per_token_mean": ev_t.mean(),
        "metrics/explained_variance_std": ev_t.std(),
        "metrics/mse": e.mean(),
        "metrics/mse_per_element": ((x - xh) ** 2).mean(),
        "metrics/cossim": ((x * xh).sum(1) / (nx * nxh)).mean(),
        "metrics/l2_ratio": (nxh / nx).mean(),
        "metrics/relative_reconstruction_bias": (nxh ** 2).mean() / (x * xh).sum(1).mean(),
        "metrics/l0": (f > 0).sum(1).mean(),
        "sparsity/dead_features": int((p == 0).sum()),
        "sparsity/dense_features": int((p > 0.1).sum()),
        "metrics/mean_log10_feature_sparsity": np.log10(p + 1e-10).mean(),
        "log10": np.log10(p + 1e-10),
    }


@pytest.mark.parametrize("with_mean", [False, True])
def test_matches_numpy_two_pass(with_mean):
    x, x_hat, f = _data()
    ref = _numpy_reference(x, x_hat, f)
    acc = ReconstructionAccumulator(x.shape[1], f.shape[1],
                                    mean=x.double().mean(0) if with_mean else None)
    for sl in (slice(0, 7), slice(7, 150), slice(150, 300)):  # uneven streaming chunks
        acc.update(x[sl], x_hat[sl], f[sl])
    out = acc.compute()
    for key, want in ref.items():
        if key == "log10":
            np.testing.assert_allclose(acc.log10_feature_density().numpy(), want, rtol=0, atol=1e-12)
            continue
        assert out[key] == pytest.approx(want, rel=1e-10, abs=1e-12), key
    assert out["metrics/n_tokens"] == 300
    assert out["sparsity/dead_features"] == 3 and out["sparsity/dense_features"] >= 1
    assert out["sparsity/dead_fraction"] == pytest.approx(3 / 40)


def test_mask_equals_subset_and_leading_dims():
    x, x_hat, f = _data(n=240)
    mask = torch.arange(240) % 3 != 0
    a = ReconstructionAccumulator(12, 40)
    a.update(x.reshape(8, 30, 12), x_hat.reshape(8, 30, 12), f.reshape(8, 30, 40), mask=mask.reshape(8, 30))
    b = ReconstructionAccumulator(12, 40)
    b.update(x[mask], x_hat[mask], f[mask])
    ra, rb = a.compute(), b.compute()
    for k in ra:
        assert ra[k] == pytest.approx(rb[k], rel=1e-12, abs=1e-14), k
    assert ra["metrics/n_tokens"] == int(mask.sum())


def test_identity_gives_ev_one_and_mean_prediction_gives_zero():
    x, _, f = _data()
    acc = ReconstructionAccumulator(12, 40)
    acc.update(x, x.clone(), f)
    out = acc.compute()
    assert out["metrics/explained_variance"] == 1.0
    assert out["metrics/explained_variance_per_token_mean"] == 1.0
    assert out["metrics/explained_variance_std"] == 0.0
    assert out["metrics/cossim"] == pytest.approx(1.0, abs=1e-12)
    assert out["metrics/l2_ratio"] == pytest.approx(1.0, abs=1e-12)
    assert out["metrics/relative_reconstruction_bias"] == pytest.approx(1.0, abs=1e-12)
    assert out["metrics/mse"] == 0.0

    mean_pred = x.double().mean(0).expand_as(x)
    acc = ReconstructionAccumulator(12, 40)
    acc.update(x.double(), mean_pred, f)
    out = acc.compute()
    assert out["metrics/explained_variance"] == pytest.approx(0.0, abs=1e-12)
    # each token's error IS its variance about the mean
    assert out["metrics/explained_variance_per_token_mean"] == pytest.approx(0.0, abs=1e-12)


def test_ev_is_about_the_mean_not_zero():
    """A large constant offset must not inflate EV (the SAELens bug): EV is invariant to shifting x and x̂."""
    x, x_hat, f = _data(offset=0.0)
    a = ReconstructionAccumulator(12, 40)
    a.update(x, x_hat, f)
    b = ReconstructionAccumulator(12, 40)
    b.update(x.double() + 1e4, x_hat.double() + 1e4, f)
    assert b.compute()["metrics/explained_variance"] == pytest.approx(a.compute()["metrics/explained_variance"],
                                                                      rel=1e-9)


def test_zero_norm_conventions():
    x = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    x_hat = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    f = torch.tensor([[1.0], [0.0], [0.0]])
    acc = ReconstructionAccumulator(2, 1)
    acc.update(x, x_hat, f)
    out = acc.compute()
    # cos: token 0 -> 1, token 1 (||x|| = 0) -> 0, token 2 (||x̂|| = 0) -> 0
    assert out["metrics/cossim"] == pytest.approx(1 / 3)
    # l2 ratio over tokens with ||x|| > 0: (2/1 + 0/2) / 2
    assert out["metrics/l2_ratio"] == pytest.approx(1.0)
    assert out["metrics/l0"] == pytest.approx(1 / 3)


def test_wrong_mean_is_refused_and_errors_are_clear():
    x, x_hat, f = _data()
    acc = ReconstructionAccumulator(12, 40, mean=x.double().mean(0) + 0.5)
    acc.update(x, x_hat, f)
    with pytest.raises(MetricError, match="differs from the mean"):
        acc.compute()
    with pytest.raises(MetricError, match="No tokens"):
        ReconstructionAccumulator(12, 40).compute()
    with pytest.raises(MetricError, match="d_in"):
        ReconstructionAccumulator(13, 40).update(x, x_hat, f)
    with pytest.raises(MetricError, match="d_sae"):
        ReconstructionAccumulator(12, 41).update(x, x_hat, f)


def test_constant_tokens_give_nan_ev_not_a_crash():
    x = torch.ones(5, 3)
    acc = ReconstructionAccumulator(3, 2)
    acc.update(x, x * 0.5, torch.zeros(5, 2))
    out = acc.compute()
    assert math.isnan(out["metrics/explained_variance"])
    assert out["metrics/explained_variance_per_token_skipped"] == 5
    assert out["sparsity/dead_features"] == 2


def test_fired_counts_replace_dense_latents():
    """update(f=None, fired_counts=c) gives the same metrics as the dense f it was counted from."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 8, generator=g)
    x_hat = x + 0.1 * torch.randn(64, 8, generator=g)
    f = torch.relu(torch.randn(64, 20, generator=g) - 1.0)
    a, b = ReconstructionAccumulator(8, 20), ReconstructionAccumulator(8, 20)
    a.update(x, x_hat, f)
    b.update(x, x_hat, None, fired_counts=(f > 0).sum(0))
    assert a.compute() == b.compute()
    with pytest.raises(MetricError, match="fired_counts"):
        b.update(x, x_hat, None)
