"""The residual-SAE baseline: residual activations as a source (batches, first buffer, exact resume), the stacked
SAE (encode/decode/forward against the brute-force formula, save/load) and a residual SAE trained on a small base
SAE's error reconstructing better than the base alone."""

from __future__ import annotations

import pytest
import torch

from domain_sae.activations.residual import ResidualSource, residual_of
from domain_sae.activations.live import StoreStateError
from domain_sae.evaluation.metrics import ReconstructionAccumulator
from domain_sae.sae.residual import ResidualStackSAE
from domain_sae.sae.standard import SAECompatibilityError, check_compatible
from domain_sae.training.trainer import Trainer
from training_helpers import SyntheticSparseSource, make_sae, tiny_config


def _sae(d_sae: int, seed: int, d_in: int = 16):
    cfg = tiny_config(d_sae=d_sae, seed=seed)
    sae = make_sae(cfg, d_in=d_in)
    with torch.no_grad():  # a nonzero encoder bias so that some latents fire on any input
        sae.b_enc.add_(0.05 * torch.randn(d_sae, generator=torch.Generator().manual_seed(seed)))
        sae.b_dec.add_(0.1 * torch.randn(d_in, generator=torch.Generator().manual_seed(seed + 1)))
    return sae.eval()


def test_residual_source_batches_and_resume():
    base = _sae(8, 0)
    src = ResidualSource(SyntheticSparseSource(seed=3), base, chunk_tokens=50)
    twin = SyntheticSparseSource(seed=3)
    with torch.no_grad():
        assert torch.allclose(src.first_buffer(), twin.first_buffer() - base(twin.first_buffer()), atol=1e-6)
        for _ in range(5):
            x = next(twin)
            assert torch.allclose(next(src), x - base(x), atol=1e-6)
    state = src.state_dict()
    expected = [next(src) for _ in range(3)]
    fresh = ResidualSource(SyntheticSparseSource(seed=3), base)
    fresh.load_state_dict(state)
    for e in expected:
        assert torch.equal(next(fresh), e)
    with pytest.raises(StoreStateError):
        fresh.load_state_dict({"refill_index": 0})
    with pytest.raises(ValueError, match="must map"):
        residual_of(torch.zeros(4, 16), lambda x: x[:, :3])


def test_stack_matches_the_formula_and_round_trips(tmp_path):
    base, res = _sae(8, 0), _sae(12, 1)
    stack = ResidualStackSAE(base, res)
    assert stack.d_sae == 20 and stack.cfg.d_sae == 20 and stack.d_in == 16
    assert all(p.requires_grad for p in base.parameters())  # the stack never freezes a shared base in place
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        f = stack.encode(x)
        f_base = base.encode(x)
        f_res = res.encode(x - base(x))
        assert torch.allclose(f, torch.cat([f_base, f_res], -1))
        expected = base(x) + res(x - base(x))
        assert torch.allclose(stack(x), expected, atol=1e-6)
        assert torch.allclose(stack.decode(stack.encode(x)), expected, atol=1e-6)
        l0 = (f > 0).sum(-1).double().mean()
        assert l0 == (f_base > 0).sum(-1).double().mean() + (f_res > 0).sum(-1).double().mean()
        # decoding latent i alone gives b_dec + its decoder row
        one = torch.zeros(20)
        one[10] = 1.0
        assert torch.allclose(stack.decode(one), stack.b_dec + stack.W_dec[10], atol=1e-6)
    assert stack.W_dec.shape == (20, 16)
    check_compatible(stack, d_in=16)
    with pytest.raises(SAECompatibilityError):
        check_compatible(stack, d_in=17)
    with pytest.raises(SAECompatibilityError):
        ResidualStackSAE(base, _sae(4, 2, d_in=15))
    stack.save(tmp_path / "stack")
    again = ResidualStackSAE.load(tmp_path / "stack")
    with torch.no_grad():
        assert torch.allclose(again(x), stack(x), atol=1e-6)
    with pytest.raises(SAECompatibilityError, match="residual_stack.json"):
        ResidualStackSAE.load(tmp_path)


def _ev(sae, x):
    acc = ReconstructionAccumulator(x.shape[1], sae.cfg.d_sae)
    with torch.no_grad():
        x_hat, f = sae.forward_with_latents(x)
    acc.update(x, x_hat, f)
    return acc.compute()["metrics/explained_variance"]


def test_trained_residual_sae_adds_what_the_base_misses(tmp_path):
    torch.set_num_threads(1)
    cfg_base = tiny_config(d_sae=6, training_tokens=128 * 80, n_checkpoints=0)
    base = make_sae(cfg_base)
    Trainer(base, cfg_base, SyntheticSparseSource(seed=0), tmp_path / "base", verbose=False).train()
    base.eval()
    cfg_res = tiny_config(d_sae=32, training_tokens=128 * 80, n_checkpoints=0, seed=1)
    residual = make_sae(cfg_res)
    # same distribution (the source's dictionary depends on its seed), read again through the base SAE's error
    Trainer(residual, cfg_res, ResidualSource(SyntheticSparseSource(seed=0), base), tmp_path / "res",
            verbose=False).train()
    stack = ResidualStackSAE(base, residual.eval())
    held_src = SyntheticSparseSource(seed=0, buffer_tokens=1000, batch_size=1000)
    next(held_src)
    held = next(held_src)  # rows of cursor 1000: never drawn by the training sources (cursors in steps of 512)
    ev_base, ev_stack = _ev(base, held), _ev(stack, held)
    assert 0.2 < ev_base < 0.6 and ev_stack > ev_base + 0.3, (ev_base, ev_stack)  # measured: 0.34 -> 0.84
