"""SAELens 6 interoperability of the TopK family and JumpReLU: SAELens loads what we write (batchtopk and
matryoshka as jumprelu) and computes the same function; we load what SAELens writes. `make test-saelens`."""

import pytest
import torch

pytestmark = pytest.mark.saelens

sae_lens = pytest.importorskip("sae_lens")

from domain_sae.sae.io import from_saelens, load_sae  # noqa: E402
from domain_sae.sae.model_config import SAEModelConfig  # noqa: E402
from domain_sae.sae.registry import get_sae_class  # noqa: E402

D_IN, D_SAE = 12, 40
META = {"model_name": "gpt2", "hook_name": "blocks.1.hook_resid_post", "context_size": 32, "prepend_bos": True,
        "dataset_path": "chat"}


def _ours(arch, **kw):
    sae = get_sae_class(arch)(SAEModelConfig(architecture=arch, d_in=D_IN, d_sae=D_SAE, k=5, metadata=dict(META),
                                             **kw))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, n).copy_(torch.randn(getattr(sae, n).shape, generator=g) * 0.4)
    return sae


@pytest.mark.parametrize("arch,kw", [("topk", {}), ("jumprelu", {"jumprelu_init_threshold": 0.2}),
                                     ("batchtopk", {}), ("matryoshka", {"matryoshka_widths": [10, 20]})])
def test_saelens_loads_our_files_and_computes_the_same(tmp_path, arch, kw):
    ours = _ours(arch, **kw)
    x = torch.randn(30, D_IN)
    if arch in ("batchtopk", "matryoshka"):
        ours.loss(x, 0.0)
        assert float(ours.topk_threshold) > 0
    ours.save(tmp_path)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path), device="cpu")
    assert theirs.cfg.architecture() == ("topk" if arch == "topk" else "jumprelu")
    with torch.no_grad():
        f = ours.encode(x)
        assert (f > 0).any()
        torch.testing.assert_close(theirs.encode(x), f, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)


def test_we_load_saelens_topk_and_jumprelu_files(tmp_path):
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    for cls, cfg_cls, extra in ((TopKSAE, TopKSAEConfig, {"k": 7}), (JumpReLUSAE, JumpReLUSAEConfig, {})):
        theirs = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, metadata=SAEMetadata(**META), **extra))
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in theirs.parameters():
                p.copy_(torch.randn(p.shape, generator=g).abs() * 0.3)
        d = tmp_path / cls.__name__
        theirs.save_model(str(d))
        ours = load_sae(d)
        x = torch.randn(20, D_IN)
        with torch.no_grad():
            torch.testing.assert_close(ours.encode(x), theirs.encode(x), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        conv = from_saelens(theirs)
        with torch.no_grad():
            torch.testing.assert_close(conv(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["topk", "batchtopk"])
def test_we_load_saelens_training_saes_saved_for_inference(tmp_path, which):
    """TopKTrainingSAE (decoder-norm rescaling folded by SAELens) and BatchTopKTrainingSAE (saved as jumprelu)."""
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    if which == "topk":
        theirs = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=6))
    else:
        theirs = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=6))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if which == "batchtopk":
            theirs.topk_threshold.fill_(0.05)
    theirs.save_inference_model(str(tmp_path))
    inference = sae_lens.SAE.load_from_disk(str(tmp_path), device="cpu")
    ours = load_sae(tmp_path)
    x = torch.randn(25, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), inference(x), rtol=1e-4, atol=1e-5)
