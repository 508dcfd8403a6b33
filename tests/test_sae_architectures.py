"""TopK, BatchTopK, Matryoshka and JumpReLU SAEs (SPEC section 2): formulas against independent computations,
sparse vs dense kernels, save/load round trips in the SAELens format, and a few training steps."""

import json

import pytest
import torch

from domain_sae.sae.io import load_sae
from domain_sae.sae.jumprelu import JumpReLUSAE
from domain_sae.sae.model_config import SAEModelConfig
from domain_sae.sae.registry import get_sae_class
from domain_sae.sae.standard import StandardSAE
from domain_sae.sae.topk import BatchTopKSAE, MatryoshkaSAE, TopKSAE

D_IN, D_SAE = 6, 16


def make(arch, seed=0, **kw):
    kw.setdefault("k", 3)
    if arch == "matryoshka":
        kw.setdefault("matryoshka_widths", [4, 8])
    sae = get_sae_class(arch)(SAEModelConfig(architecture=arch, d_in=D_IN, d_sae=D_SAE, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(torch.randn(getattr(sae, name).shape, generator=g) * 0.5)
    return sae


def x_batch(n=24, seed=1):
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


def pre(sae, x):
    xc = x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x
    return (xc @ sae.W_enc + sae.b_enc).detach()


# -- formulas ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_topk_encode_keeps_the_k_largest_relu_per_token(apply_b_dec):
    sae = make("topk", apply_b_dec_to_input=apply_b_dec)
    x = x_batch()
    z = pre(sae, x)
    want = torch.zeros_like(z)
    for t in range(z.shape[0]):
        order = sorted(range(D_SAE), key=lambda i: -float(z[t, i]))[:3]
        for i in order:
            want[t, i] = max(float(z[t, i]), 0.0)
    torch.testing.assert_close(sae.encode(x).detach(), want)
    out = sae.loss(x, 0.0)
    torch.testing.assert_close(out.f.detach(), want)
    torch.testing.assert_close(out.mse, ((want @ sae.W_dec + sae.b_dec - x) ** 2).sum(-1).mean())
    assert float(out.l1) == 0.0 and float(out.total) == pytest.approx(float(out.mse))


def test_batchtopk_keeps_k_times_batch_over_the_batch_and_tracks_the_threshold():
    sae = make("batchtopk", topk_threshold_lr=0.25)
    x = x_batch()
    z = torch.relu(pre(sae, x)).reshape(-1)
    n = 3 * x.shape[0]
    keep = sorted(range(z.numel()), key=lambda j: -float(z[j]))[:n]
    want = torch.zeros_like(z)
    want[keep] = z[keep]
    out = sae.loss(x, 0.0)
    torch.testing.assert_close(out.f.detach().reshape(-1), want)
    m = float(want[want > 0].min())
    assert float(sae.topk_threshold) == pytest.approx(0.25 * m, rel=1e-6)
    sae.loss(x, 0.0)
    assert float(sae.topk_threshold) == pytest.approx(0.75 * 0.25 * m + 0.25 * m, rel=1e-6)
    # inference: ReLU(z) * 1[z > theta]
    zz = pre(sae, x)
    theta = float(sae.topk_threshold)
    torch.testing.assert_close(sae.encode(x).detach(), torch.where(zz > theta, zz, torch.zeros_like(zz)))


def test_matryoshka_loss_sums_the_prefix_reconstructions():
    sae = make("matryoshka")
    assert sae.cfg.matryoshka_widths == [4, 8, D_SAE]
    x = x_batch()
    out = sae.loss(x, 0.0)
    f = out.f.detach()
    want = 0.0
    for m in (4, 8, D_SAE):
        xh = f[:, :m] @ sae.W_dec[:m] + sae.b_dec
        want += float(((xh - x) ** 2).sum(-1).mean())
    assert float(out.total) == pytest.approx(want, rel=1e-5)
    assert set(out.terms) == {"inner_mse_loss_4", "inner_mse_loss_8"}


@pytest.mark.parametrize("bad", [[8, 4], [0, 8], [4, 4]])
def test_matryoshka_refuses_bad_widths(bad):
    with pytest.raises(ValueError, match="matryoshka_widths"):
        make("matryoshka", matryoshka_widths=bad)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
def test_auxk_reconstructs_the_residual_from_the_top_dead_preactivations(arch):
    sae = make(arch, aux_k=2, aux_k_coefficient=0.5)
    x = x_batch()
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[1, 5, 9, 12]] = True
    out = sae.loss(x, 0.0, dead_mask=dead)
    z = pre(sae, x)
    e = (x - out.x_hat).detach()
    acts = torch.zeros_like(z)
    for t in range(z.shape[0]):
        top = sorted([1, 5, 9, 12], key=lambda i: -float(z[t, i]))[:2]
        acts[t, top] = z[t, top]
    want = 0.5 * float(((e - acts @ sae.W_dec) ** 2).sum(-1).mean())
    assert float(out.aux) == pytest.approx(want, rel=1e-5)
    assert float(sae.loss(x, 0.0).aux) == 0.0  # no dead latents, no aux loss
    # a stale, larger host count gives the same loss (missing dead latents are skipped)
    assert float(make(arch, aux_k=2, aux_k_coefficient=0.5).loss(x, 0.0, dead_mask=dead, n_dead=4).aux) == \
        pytest.approx(want, rel=1e-5)


def test_jumprelu_forward_loss_and_threshold_gradient_match_the_estimator():
    sae = make("jumprelu", jumprelu_bandwidth=0.5, jumprelu_init_threshold=0.3)
    x = x_batch()
    out = sae.loss(x, 0.2)
    z = pre(sae, x)
    theta = torch.full((D_SAE,), 0.3)
    f = z * (z > theta)
    torch.testing.assert_close(out.f.detach(), f)
    norms = sae.W_dec.detach().norm(dim=-1)
    l1 = torch.tanh(4.0 * f * norms).sum(-1).mean()
    torch.testing.assert_close(out.l1.detach(), l1)
    out.total.backward()
    # d total / d theta_i through the estimator: d f/d theta = -(theta/eps) K((z - theta)/eps); chain to log theta
    xh = f @ sae.W_dec.detach() + sae.b_dec.detach()
    dL_df = 2 * (xh - x) @ sae.W_dec.detach().T / x.shape[0] + 0.2 * 4.0 * norms * (
        1 - torch.tanh(4.0 * f * norms) ** 2) / x.shape[0]
    K = ((z - theta).abs() / 0.5 < 0.5).float()
    dtheta = (dL_df * (-(theta / 0.5) * K)).sum(0)
    torch.testing.assert_close(sae.log_threshold.grad, dtheta * theta, rtol=1e-4, atol=1e-6)


def test_jumprelu_step_sparsity_is_the_l0():
    sae = make("jumprelu", jumprelu_sparsity_loss="step", jumprelu_init_threshold=0.2)
    x = x_batch()
    out = sae.loss(x, 1.0)
    assert float(out.l1) == pytest.approx(float((pre(sae, x) > 0.2).float().sum(-1).mean()))


# -- kernels -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["standard", "topk", "batchtopk", "matryoshka"])
def test_sparse_and_dense_kernels_give_the_same_loss_and_gradients(arch):
    x = x_batch(40)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True
    results = []
    for mode in ("dense", "sparse"):
        sae = make(arch, apply_b_dec_to_input=True)
        sae.configure_kernels(mode)
        out = sae.loss(x, 0.3, dead_mask=dead if arch != "standard" else None)
        out.total.backward()
        results.append((out, {n: p.grad.clone() for n, p in sae.named_parameters()}))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a.total, b.total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.f, b.f)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-5)


def test_relu_sae_switches_to_sparse_kernels_below_the_density_threshold():
    sae = make("standard")
    sae.configure_kernels("auto", density_threshold=0.99)
    x = x_batch()
    sae.loss(x, 1.0)
    assert sae.uses_sparse_kernels()
    sae.configure_kernels("auto", density_threshold=1e-6)
    sae._calls = 0
    sae.loss(x, 1.0)
    assert not sae.uses_sparse_kernels()
    state = sae.state_dict()
    other = make("standard")
    other.load_state_dict(state)
    assert (other._calls, other._sparse_now) == (sae._calls, sae._sparse_now)



def test_relu_sae_on_cpu_measures_its_density_at_every_pass():
    sae = make("standard")
    sae.configure_kernels("auto", density_threshold=1e-6)
    x = x_batch()
    sae.loss(x, 1.0)
    assert not sae.uses_sparse_kernels()
    sae.configure_kernels("auto", density_threshold=0.99)
    sae.loss(x, 1.0)  # the second pass: on a GPU the next reading would be at pass DENSITY_CHECK_EVERY
    assert sae.uses_sparse_kernels()

# -- persistence ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,written", [("topk", "topk"), ("jumprelu", "jumprelu"), ("batchtopk", "jumprelu"),
                                          ("matryoshka", "jumprelu")])
def test_save_load_round_trip_in_the_saelens_layout(tmp_path, arch, written):
    sae = make(arch, metadata={"model_name": "m", "hook_name": "blocks.1.hook_resid_post"})
    x = x_batch()
    if arch in ("batchtopk", "matryoshka"):
        sae.loss(x, 0.0)  # set a threshold
    sae.save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == written and cfg["d_in"] == D_IN and cfg["d_sae"] == D_SAE
    if arch == "topk":
        assert cfg["k"] == 3 and cfg["rescale_acts_by_decoder_norm"] is False
    if written == "jumprelu" and arch != "jumprelu":
        assert cfg["metadata"]["training_architecture"] == arch
        assert cfg["metadata"]["training_architecture_details"]["k"] == 3
    from safetensors.torch import load_file
    tensors = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert ("threshold" in tensors) == (written == "jumprelu")
    back = load_sae(tmp_path)
    assert back.cfg.architecture == written
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x), sae.encode(x))
        torch.testing.assert_close(back(x), sae(x))


def test_saelens_topk_with_decoder_norm_rescaling_is_folded_exactly(tmp_path):
    """SAELens TopK with rescale_acts_by_decoder_norm: select on z * n, decode f / n."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(4)
    w = {"W_enc": torch.randn(D_IN, D_SAE, generator=g), "b_enc": torch.randn(D_SAE, generator=g),
         "W_dec": torch.randn(D_SAE, D_IN, generator=g) * 3, "b_dec": torch.randn(D_IN, generator=g)}
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({
        "architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "apply_b_dec_to_input": False,
        "normalize_activations": "none", "k": 4, "rescale_acts_by_decoder_norm": True,
        "metadata": {"model_name": "gpt2", "hook_name": "blocks.0.hook_resid_pre"}}))
    sae = load_sae(tmp_path)
    x = x_batch()
    n = w["W_dec"].norm(dim=-1)
    h = (x @ w["W_enc"] + w["b_enc"]) * n
    top = h.topk(4, dim=-1)
    f = torch.zeros_like(h).scatter(-1, top.indices, top.values.relu())
    want = (f / n) @ w["W_dec"] + w["b_dec"]
    with torch.no_grad():
        torch.testing.assert_close(sae(x), want, rtol=1e-5, atol=1e-5)


def test_saelens_jumprelu_file_loads(tmp_path):
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(6)
    w = {"W_enc": torch.randn(D_IN, D_SAE, generator=g), "b_enc": torch.randn(D_SAE, generator=g),
         "W_dec": torch.randn(D_SAE, D_IN, generator=g), "b_dec": torch.randn(D_IN, generator=g),
         "threshold": torch.rand(D_SAE, generator=g)}
    w["threshold"][0] = 0.0
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({
        "architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "metadata": {"model_name": "gemma", "hook_name": "blocks.0.hook_resid_post",
                                                      "training_architecture_details": {"jumprelu_bandwidth": 0.1}}}))
    sae = load_sae(tmp_path)
    assert isinstance(sae, JumpReLUSAE) and sae.cfg.jumprelu_bandwidth == 0.1
    x = x_batch()
    h = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    f = h.relu() * (h > w["threshold"])
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), f)
        torch.testing.assert_close(sae(x), f @ w["W_dec"] + w["b_dec"])


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "matryoshka"])
def test_fold_activation_scale_keeps_the_function(arch):
    sae = make(arch)
    x = x_batch()
    if arch in ("batchtopk", "matryoshka"):
        sae.loss(x * 2.5, 0.0)
    with torch.no_grad():
        before = sae(x * 2.5) / 2.5
        f_before = sae.encode(x * 2.5)
        sae.fold_activation_scale(2.5)
        torch.testing.assert_close(sae(x), before, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.encode(x), f_before, rtol=1e-5, atol=1e-5)


def test_every_class_implements_the_contract():
    from domain_sae.sae.base import SAE
    for cls in (StandardSAE, TopKSAE, BatchTopKSAE, MatryoshkaSAE, JumpReLUSAE):
        sae = make(cls.architecture)
        assert isinstance(sae, SAE)
    with pytest.raises(ValueError, match="implements"):
        TopKSAE(SAEModelConfig(architecture="standard", d_in=2, d_sae=3))


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "matryoshka"])
def test_evaluation_runs_every_architecture_through_encode_and_decode(tiny_lm, arch):
    """`dsae eval`'s evaluate_sae on a tiny model: L0 and EV equal those computed from sae.encode / sae.decode."""
    from domain_sae.evaluation.runner import evaluate_sae
    from domain_sae.models.hooks import capture, resolve_hook
    hook = resolve_hook(tiny_lm.model, "blocks.0.hook_mlp_out")
    d = 32
    kw = {"matryoshka_widths": [16, 32]} if arch == "matryoshka" else {}
    sae = get_sae_class(arch)(SAEModelConfig(architecture=arch, d_in=d, d_sae=64, k=4, **kw))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, n).copy_(torch.randn(getattr(sae, n).shape, generator=g) * 0.3)
    ids = torch.randint(5, 1000, (2, 12), generator=g)
    segs = torch.ones(2, 12, dtype=torch.int8)
    res = evaluate_sae(sae, tiny_lm, hook, ids, segs, batch_size=2, per_segment=False)
    x = capture(tiny_lm.model, hook, ids).reshape(-1, d).double()
    with torch.no_grad():
        f = sae.encode(x.float()).double()
        xh = sae.decode(f.float()).double()
    assert res["metrics/l0"] == pytest.approx(float((f > 0).sum(-1).double().mean()), rel=1e-6)
    ev = 1 - ((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert res["metrics/explained_variance"] == pytest.approx(float(ev), rel=1e-4, abs=1e-6)
