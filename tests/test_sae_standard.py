"""StandardSAE: forward/loss against an independent float64 computation (SPEC 1), scale folding, decoder-norm
helpers, compatibility checks."""

import pytest
import torch

from domain_sae.errors import UserError
from domain_sae.sae.standard import (LossOutput, SAECompatibilityError, SAEModelConfig, StandardSAE,
                                     check_compatible)

D_IN, D_SAE = 6, 10


def make(seed=0, **kw) -> StandardSAE:
    meta = kw.pop("metadata", {"model_name": "tiny", "hook_name": "blocks.0.hook_mlp_out"})
    sae = StandardSAE(SAEModelConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return sae


def reference(sae: StandardSAE, x: torch.Tensor, lam: float):
    """Token-by-token float64 loop: the SPEC 1 formulas written out independently of the implementation."""
    W_enc, b_enc = sae.W_enc.detach().double(), sae.b_enc.detach().double()
    W_dec, b_dec = sae.W_dec.detach().double(), sae.b_dec.detach().double()
    cfg = sae.cfg
    X = x.double().reshape(-1, x.shape[-1])
    mean = X.mean(0)
    mse_terms, l1_terms, fs, xhs = [], [], [], []
    for t in range(X.shape[0]):
        xt = X[t]
        z = [sum((xt[j] - (b_dec[j] if cfg.apply_b_dec_to_input else 0.0)) * W_enc[j, i] for j in range(D_IN))
             + b_enc[i] for i in range(D_SAE)]
        f = torch.tensor([max(float(v), 0.0) for v in z], dtype=torch.float64)
        xh = torch.stack([sum(f[i] * W_dec[i, j] for i in range(D_SAE)) + b_dec[j] for j in range(D_IN)])
        denom = 1.0
        if cfg.mse_loss_normalization == "dense_batch":
            denom = float(torch.sqrt(((xt - mean) ** 2).sum())) + 1e-6
        mse_terms.append(sum(float((xh[j] - xt[j]) ** 2) / denom for j in range(D_IN)))
        s = [float(torch.sqrt((W_dec[i] ** 2).sum())) if cfg.scale_sparsity_penalty_by_decoder_norm else 1.0
             for i in range(D_SAE)]
        p = cfg.lp_norm
        l1_terms.append(sum(abs(float(f[i]) * s[i]) ** p for i in range(D_SAE)) ** (1.0 / p))
        fs.append(f)
        xhs.append(xh)
    mse = sum(mse_terms) / len(mse_terms)
    l1 = sum(l1_terms) / len(l1_terms)
    return mse, l1, torch.stack(fs), torch.stack(xhs)


@pytest.mark.parametrize("opts", [
    {},
    {"apply_b_dec_to_input": True},
    {"mse_loss_normalization": "dense_batch"},
    {"scale_sparsity_penalty_by_decoder_norm": False},
    {"lp_norm": 2.0},
    {"apply_b_dec_to_input": True, "mse_loss_normalization": "dense_batch", "lp_norm": 1.5},
])
def test_loss_matches_float64_reference(opts):
    sae = make(**opts)
    x = torch.randn(3, 4, D_IN, generator=torch.Generator().manual_seed(1))
    lam = 0.7
    out = sae.loss(x, lam)
    assert isinstance(out, LossOutput)
    mse, l1, f, xh = reference(sae, x, lam)
    assert out.f.shape == (3, 4, D_SAE) and out.x_hat.shape == (3, 4, D_IN)
    torch.testing.assert_close(out.f.reshape(-1, D_SAE).double(), f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.x_hat.reshape(-1, D_IN).double(), xh, rtol=1e-5, atol=1e-5)
    assert out.mse.item() == pytest.approx(mse, rel=1e-5)
    assert out.l1.item() == pytest.approx(l1, rel=1e-5)
    assert out.raw_l1.item() == pytest.approx(lam * l1, rel=1e-5)
    assert out.total.item() == pytest.approx(mse + lam * l1, rel=1e-5)
    assert (f > 0).any() and (f == 0).any()  # the ReLU is exercised on both sides


def test_forward_encode_decode_consistent_and_leading_shapes():
    sae = make()
    x = torch.randn(2, 3, 5, D_IN)
    x_hat, f = sae.forward_with_latents(x)
    assert f.shape == (2, 3, 5, D_SAE) and x_hat.shape == x.shape
    torch.testing.assert_close(sae(x), x_hat)
    torch.testing.assert_close(sae.decode(sae.encode(x)), x_hat)
    torch.testing.assert_close(sae(x[0, 0, 0]), x_hat[0, 0, 0])  # a single vector works too
    assert sae.device.type == "cpu" and sae.dtype == torch.float32


def test_loss_backward_gives_gradients():
    sae = make()
    sae.loss(torch.randn(16, D_IN), 1.0).total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in sae.parameters())


def test_new_sae_is_zero_and_dtype_follows_cfg():
    sae = StandardSAE(SAEModelConfig(d_in=4, d_sae=8, dtype="bfloat16"))
    assert sae.W_enc.shape == (4, 8) and sae.W_dec.shape == (8, 4)
    assert sae.b_enc.shape == (8,) and sae.b_dec.shape == (4,)
    assert sae.dtype == torch.bfloat16
    assert all(not p.detach().any() for p in sae.parameters())
    sae.to(torch.float32)
    assert sae.cfg.dtype == "float32"


@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_fold_activation_scale(apply_b_dec):
    sae = make(apply_b_dec_to_input=apply_b_dec, normalize_activations="expected_average_only_in")
    folded = make(apply_b_dec_to_input=apply_b_dec, normalize_activations="expected_average_only_in")
    s = 2.7
    folded.fold_activation_scale(s)
    x = torch.randn(20, D_IN) * 3
    torch.testing.assert_close(folded.encode(x), sae.encode(s * x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded(x), sae(s * x) / s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded.b_enc, sae.b_enc)
    assert folded.cfg.normalize_activations == "none"
    assert folded.cfg.metadata["activation_scale"] == pytest.approx(s)
    folded.fold_activation_scale(0.5)  # folding again multiplies the recorded scale
    assert folded.cfg.metadata["activation_scale"] == pytest.approx(s * 0.5)
    with pytest.raises(ValueError):
        folded.fold_activation_scale(0.0)


def test_fold_then_unfold_is_identity():
    sae = make()
    ref = {k: v.clone() for k, v in sae.state_dict().items()}
    sae.fold_activation_scale(3.0)
    sae.fold_activation_scale(1 / 3.0)
    for k, v in sae.state_dict().items():
        torch.testing.assert_close(v, ref[k])


def test_decoder_unit_norm_and_parallel_gradient_removal():
    sae = make()
    sae.loss(torch.randn(8, D_IN), 1.0).total.backward()
    g_before = sae.W_dec.grad.clone()
    sae.remove_gradient_parallel_to_decoder_directions()
    w = sae.W_dec.detach().double()
    g = sae.W_dec.grad.double()
    # independent check: the projection removes exactly <g, w_hat> w_hat from each row
    w_hat = w / w.norm(dim=-1, keepdim=True)
    expected = g_before.double() - (g_before.double() * w_hat).sum(-1, keepdim=True) * w_hat
    torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-6)
    assert (g * w).sum(-1).abs().max() < 1e-5
    sae.set_decoder_norm_to_unit_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))
    torch.testing.assert_close(sae.W_dec.detach().double(), w_hat, rtol=1e-5, atol=1e-6)


def test_compatibility_errors_name_both_sides():
    sae = make()
    check_compatible(sae, d_in=D_IN, model_name="tiny", hook_name="blocks.0.hook_mlp_out")
    check_compatible(sae, d_in=D_IN)  # unknown model/hook: nothing to compare
    with pytest.raises(SAECompatibilityError) as e:
        check_compatible(sae, d_in=576)
    assert "576" in str(e.value) and str(D_IN) in str(e.value)
    assert isinstance(e.value, UserError)
    with pytest.raises(SAECompatibilityError) as e:
        check_compatible(sae, d_in=D_IN, hook_name="blocks.3.hook_resid_post")
    assert "blocks.0.hook_mlp_out" in str(e.value) and "blocks.3.hook_resid_post" in str(e.value)
    with pytest.raises(SAECompatibilityError) as e:
        check_compatible(sae, d_in=D_IN, model_name="gpt2")
    assert "tiny" in str(e.value) and "gpt2" in str(e.value)
    # a hub id and a local path ending in the same name count as the same model
    check_compatible(make(metadata={"model_name": "HuggingFaceTB/SmolLM2-135M"}), d_in=D_IN,
                     model_name="/models/SmolLM2-135M/")


def test_wrong_input_width_is_a_clear_error():
    with pytest.raises(SAECompatibilityError, match="d_in=6"):
        make().encode(torch.randn(3, 7))
