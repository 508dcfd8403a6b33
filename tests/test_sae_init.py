"""Initialisation options of SPEC 1 (decoder norms, encoder transpose / Kaiming, b_dec zeros / mean /
geometric median, unit-norm decoder) and determinism."""

import math
from types import SimpleNamespace

import pytest
import torch

from domain_sae.config import ConfigError
from domain_sae.sae.init import geometric_median, initialize
from domain_sae.sae.standard import SAEModelConfig, StandardSAE

D_IN, D_SAE = 8, 32


def cfg(**kw):
    base = dict(decoder_heuristic_init=True, decoder_init_norm=0.1, init_encoder_as_decoder_transpose=True,
                b_dec_init_method="zeros", normalize_sae_decoder=False, scale_sparsity_penalty_by_decoder_norm=True,
                seed=0)
    base.update(kw)
    return SimpleNamespace(**base)


def new():
    return StandardSAE(SAEModelConfig(d_in=D_IN, d_sae=D_SAE))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_heuristic_decoder_rows_have_init_norm_and_encoder_is_transpose():
    sae = new()
    initialize(sae, cfg(decoder_init_norm=0.25), None, gen())
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.full((D_SAE,), 0.25))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)
    assert not sae.b_enc.detach().any() and not sae.b_dec.detach().any()
    # rows point in different directions (random, not a constant)
    cos = torch.nn.functional.normalize(sae.W_dec.detach(), dim=-1) @ torch.nn.functional.normalize(
        sae.W_dec.detach(), dim=-1).T
    assert (cos - torch.eye(D_SAE)).abs().max() < 0.99


def test_kaiming_uniform_encoder_when_not_transposed():
    sae = new()
    initialize(sae, cfg(init_encoder_as_decoder_transpose=False), None, gen())
    bound = math.sqrt(6.0 / D_IN)
    w = sae.W_enc.detach()
    assert w.abs().max() <= bound + 1e-6
    assert w.abs().max() > 0.8 * bound  # spans the range (256 uniform draws)
    assert not torch.allclose(w, sae.W_dec.detach().T)
    # uniform on [-b, b] has variance b^2 / 3
    assert float(w.var()) == pytest.approx(bound ** 2 / 3, rel=0.25)


def test_kaiming_decoder_without_heuristic_and_unit_norm():
    sae = new()
    initialize(sae, cfg(decoder_heuristic_init=False, normalize_sae_decoder=True,
                        scale_sparsity_penalty_by_decoder_norm=False), None, gen())
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)


def test_unit_norm_decoder_conflicts_are_rejected():
    with pytest.raises(ConfigError, match="decoder_heuristic_init"):
        initialize(new(), cfg(normalize_sae_decoder=True, scale_sparsity_penalty_by_decoder_norm=False), None, gen())
    with pytest.raises(ConfigError, match="scale_sparsity_penalty_by_decoder_norm"):
        initialize(new(), cfg(normalize_sae_decoder=True, decoder_heuristic_init=False), None, gen())


def test_b_dec_mean():
    sample = torch.randn(200, D_IN, generator=gen(3)) * 2 + 5
    sae = new()
    initialize(sae, cfg(b_dec_init_method="mean"), sample, gen())
    torch.testing.assert_close(sae.b_dec.detach().double(), sample.double().mean(0), rtol=1e-6, atol=1e-6)


def test_b_dec_geometric_median_of_symmetric_set():
    # Points symmetric about c (pairs c +- v): the geometric median is c. Add far outliers in symmetric pairs too.
    c = torch.arange(D_IN, dtype=torch.float32) - 3.0
    v = torch.randn(50, D_IN, generator=gen(5))
    v[:4] *= 100.0
    sample = torch.cat([c + v, c - v])
    sae = new()
    initialize(sae, cfg(b_dec_init_method="geometric_median"), sample, gen())
    torch.testing.assert_close(sae.b_dec.detach(), c, rtol=0, atol=1e-4)


def test_geometric_median_is_robust_and_minimises_sum_of_distances():
    g = gen(7)
    pts = torch.randn(101, 3, generator=g, dtype=torch.float64)
    pts[:10] += 1000.0  # outliers drag the mean, not the median
    m = geometric_median(pts)
    cost = lambda y: float((pts - y).norm(dim=-1).sum())  # noqa: E731
    assert cost(m) <= cost(pts.mean(0))
    for _ in range(20):  # no nearby point does better
        assert cost(m) <= cost(m + 1e-3 * torch.randn(3, generator=g, dtype=torch.float64)) + 1e-9
    assert float(m.norm()) < 5.0
    # 1-d: the geometric median is the ordinary median
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0], [50.0]], dtype=torch.float64)
    assert float(geometric_median(x)) == pytest.approx(2.0, abs=1e-4)


def test_b_dec_sample_required_and_width_checked():
    with pytest.raises(ConfigError, match="sample"):
        initialize(new(), cfg(b_dec_init_method="mean"), None, gen())
    with pytest.raises(ConfigError, match="width"):
        initialize(new(), cfg(b_dec_init_method="mean"), torch.randn(10, D_IN + 1), gen())


def test_deterministic_given_generator_and_different_for_other_seeds():
    a, b, c = new(), new(), new()
    initialize(a, cfg(init_encoder_as_decoder_transpose=False), None, gen(1))
    initialize(b, cfg(init_encoder_as_decoder_transpose=False), None, gen(1))
    initialize(c, cfg(init_encoder_as_decoder_transpose=False), None, gen(2))
    for k in ("W_enc", "W_dec"):
        assert torch.equal(getattr(a, k), getattr(b, k))
        assert not torch.equal(getattr(a, k), getattr(c, k))


def test_accepts_the_real_train_config():
    from domain_sae.config import TrainConfig
    tc = TrainConfig(d_sae=D_SAE, normalize_activations="none", b_dec_init_method="mean").validate()
    sae = new()
    sample = torch.randn(64, D_IN)
    initialize(sae, tc, sample, gen())
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.full((D_SAE,), tc.decoder_init_norm))
    torch.testing.assert_close(sae.b_dec.detach(), sample.mean(0), rtol=1e-5, atol=1e-6)
