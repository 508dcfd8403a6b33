"""Interoperability with the real SAELens package (version 6): it loads what we write, we load what it writes, and
both compute the same function. Run with `make test-saelens` (a separate virtualenv with sae-lens installed)."""

import pytest
import torch

pytestmark = pytest.mark.saelens

sae_lens = pytest.importorskip("sae_lens")

from domain_sae.sae.io import from_saelens, load_sae, load_sparsity  # noqa: E402
from domain_sae.sae.standard import SAEModelConfig, StandardSAE  # noqa: E402

D_IN, D_SAE = 16, 48


def _ours(apply_b_dec: bool, seed: int = 0) -> StandardSAE:
    meta = {"model_name": "HuggingFaceTB/SmolLM2-135M-Instruct", "hook_name": "blocks.2.hook_resid_post",
            "context_size": 64, "prepend_bos": True, "dataset_path": "chat", "training_tokens": 12345,
            "activation_scale": 1.7, "lineage": {"parent": "x", "tokens_before": 0, "tokens_after": 12345}}
    sae = StandardSAE(SAEModelConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=apply_b_dec, metadata=meta))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return sae


@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_saelens_loads_our_directory_and_encodes_identically(tmp_path, apply_b_dec):
    ours = _ours(apply_b_dec)
    ours.save(tmp_path, sparsity=torch.linspace(-8, -1, D_SAE))
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path), device="cpu")
    assert theirs.cfg.architecture() == "standard"
    assert theirs.cfg.d_in == D_IN and theirs.cfg.d_sae == D_SAE
    assert bool(theirs.cfg.apply_b_dec_to_input) is apply_b_dec
    assert theirs.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    assert theirs.cfg.metadata.model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert theirs.cfg.metadata.context_size == 64
    x = torch.randn(4, 5, D_IN)
    with torch.no_grad():
        f_ours, f_theirs = ours.encode(x), theirs.encode(x)
        assert (f_ours > 0).any()
        torch.testing.assert_close(f_theirs, f_ours, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(theirs.decode(f_theirs), ours.decode(f_ours), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_we_load_a_directory_saved_by_saelens(tmp_path, apply_b_dec):
    from sae_lens import StandardSAE as LensSAE
    from sae_lens import StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    cfg = StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=apply_b_dec,
                            metadata=SAEMetadata(model_name="gpt2", hook_name="blocks.5.hook_resid_pre",
                                                 context_size=128, prepend_bos=True, dataset_path="pile"))
    theirs = LensSAE(cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    theirs.save_model(str(tmp_path))
    ours = load_sae(tmp_path)
    assert ours.cfg.apply_b_dec_to_input is apply_b_dec
    assert ours.cfg.metadata["hook_name"] == "blocks.5.hook_resid_pre"
    assert ours.cfg.metadata["model_name"] == "gpt2"
    assert load_sparsity(tmp_path) is None or load_sparsity(tmp_path).shape == (D_SAE,)
    x = torch.randn(10, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    # the in-memory conversion gives the same SAE
    conv = from_saelens(theirs)
    for k in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(conv, k), getattr(ours, k))


def test_round_trip_through_saelens(tmp_path):
    """ours -> disk -> SAELens -> disk -> ours gives back the same weights and the same hook/model."""
    ours = _ours(False, seed=5)
    ours.save(tmp_path / "a")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "a"), device="cpu")
    theirs.save_model(str(tmp_path / "b"))
    back = load_sae(tmp_path / "b")
    for k in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(back, k), getattr(ours, k))
    assert back.cfg.metadata["hook_name"] == ours.cfg.metadata["hook_name"]
    assert back.cfg.metadata["training_tokens"] == 12345  # our extra metadata survives SAELens's round trip


def test_unfolded_saelens_checkpoint_is_folded_with_its_activation_scaler(tmp_path):
    """A SAELens intermediate checkpoint (scale not yet folded, written by its ActivationScaler) loads in ours as an
    SAE that takes raw activations: ours(x) == theirs(s x) / s."""
    from sae_lens import StandardSAE as LensSAE
    from sae_lens import StandardSAEConfig
    from sae_lens.training.activation_scaler import ActivationScaler

    s = 2.5
    cfg = StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, normalize_activations="expected_average_only_in")
    theirs = LensSAE(cfg)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    theirs.save_model(str(tmp_path))
    ActivationScaler(scaling_factor=s).save(str(tmp_path / "activation_scaler.json"))
    ours = load_sae(tmp_path)
    assert ours.cfg.normalize_activations == "none"
    x = torch.randn(10, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(s * x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours(x), theirs(s * x) / s, rtol=1e-5, atol=1e-6)
