"""Every architecture trains through the same Trainer: the loss falls, sparse and dense kernels give the same loss
trace at equal tokens, and the fast-path options (bf16 autocast, torch.compile) run the same code on CPU."""

import json

import pytest
import torch

from domain_sae.runs import single as pipeline
from domain_sae.config import ConfigError
from domain_sae.sae.init import initialize
from domain_sae.sae.io import load_sae
from domain_sae.training.trainer import Trainer

from training_helpers import SyntheticSparseSource, tiny_config


def train(tmp_path, name, **kw):
    kw.setdefault("k", 4)
    cfg = tiny_config(n_checkpoints=0, log_every=1, **kw)
    sae = pipeline.new_sae(cfg, 16, {"model_name": "synthetic", "hook_name": "synthetic"})
    initialize(sae, cfg, None, torch.Generator().manual_seed(cfg.seed))
    src = SyntheticSparseSource(batch_size=cfg.train_batch_size_tokens, buffer_tokens=cfg.buffer_size_tokens,
                                seed=cfg.seed)
    trainer = Trainer(sae, cfg, src, tmp_path / name, verbose=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = trainer.train()
    finally:
        torch.set_num_threads(threads)
    recs = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return trainer, summary, recs


@pytest.mark.parametrize("arch", ["standard", "topk", "batchtopk", "jumprelu", "matryoshka"])
def test_training_a_few_steps_reduces_the_loss(tmp_path, arch):
    extra = {"matryoshka_widths": [16, 32]} if arch == "matryoshka" else {}
    trainer, summary, recs = train(tmp_path, arch, architecture=arch, training_tokens=128 * 40,
                                   l1_coefficient=0.3 if arch != "jumprelu" else 0.01, **extra)
    mse = [r["losses/mse_loss"] for r in recs]
    assert mse[-1] < 0.6 * mse[0]
    assert "losses/auxiliary_reconstruction_loss" in recs[-1] if arch in ("topk", "batchtopk", "matryoshka") \
        else True
    back = load_sae(tmp_path / arch / "sae")
    x = torch.randn(10, 16)
    with torch.no_grad():
        torch.testing.assert_close(back(x), trainer.final_sae()(x), rtol=1e-5, atol=1e-5)
    if arch == "topk":
        assert all(r["metrics/l0"] <= 4 + 1e-9 for r in recs)


@pytest.mark.parametrize("arch", ["standard", "topk", "matryoshka"])
def test_sparse_and_dense_kernels_give_the_same_loss_trace(tmp_path, arch):
    extra = {"matryoshka_widths": [16, 32]} if arch == "matryoshka" else {}
    traces = []
    for mode in ("dense", "sparse"):
        _, _, recs = train(tmp_path, f"{arch}-{mode}", architecture=arch, kernels=mode, training_tokens=128 * 25,
                           dead_feature_window=3, **extra)
        traces.append([r["losses/overall_loss"] for r in recs])
    assert len(traces[0]) == len(traces[1]) == 25
    torch.testing.assert_close(torch.tensor(traces[1]), torch.tensor(traces[0]), rtol=2e-4, atol=1e-6)


def test_bf16_autocast_and_compile_run_the_same_step_on_cpu(tmp_path):
    _, _, ref = train(tmp_path, "fp32", architecture="topk", training_tokens=128 * 16, autocast="none")
    _, _, bf = train(tmp_path, "bf16", architecture="topk", training_tokens=128 * 16, autocast="bfloat16")
    assert bf[-1]["losses/mse_loss"] < bf[0]["losses/mse_loss"]
    assert bf[0]["losses/mse_loss"] == pytest.approx(ref[0]["losses/mse_loss"], rel=0.05)
    assert bf[0]["losses/mse_loss"] != ref[0]["losses/mse_loss"]  # really ran in bfloat16
    _, _, comp = train(tmp_path, "compiled", architecture="standard", training_tokens=128 * 16,
                        compile_backend="eager")
    _, _, plain = train(tmp_path, "plain", architecture="standard", training_tokens=128 * 16)
    torch.testing.assert_close(torch.tensor([r["losses/overall_loss"] for r in comp]),
                               torch.tensor([r["losses/overall_loss"] for r in plain]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad", [{"k": 0}, {"matryoshka_widths": [8, 4]}, {"sparse_density_threshold": 0.0},
                                 {"jumprelu_bandwidth": -1.0}])
def test_bad_architecture_options_are_config_errors(bad):
    with pytest.raises(ConfigError):
        tiny_config(**bad)
