"""The small shared modules and single definitions: JSON sanitising, hub reachability, model identity, unwrapping a
loaded model, chunked activation reading and the one error hierarchy."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model
from domain_sae import errors
from domain_sae.util import hf
from domain_sae.activations.live import ActivationSourceError, kept_activations, read_sequences
from domain_sae.analysis.errors import AnalysisError
from domain_sae.cli import main
from domain_sae.config import ConfigError
from domain_sae.data.sources import DataError
from domain_sae.util.jsonsafe import INF_AS, jsonable
from domain_sae.models import LoadedModel, as_module, same_model_name, tokenizer_of
from domain_sae.sae.standard import SAECompatibilityError, SAEModelConfig, StandardSAE, check_compatible
from domain_sae.study.config import StudyError
from domain_sae.study.report import ReportError


def test_jsonable_makes_strict_json():
    obj = {1: float("nan"), "t": torch.tensor([1.5, float("inf")]), "p": Path("/x/y"), "n": (1, True, None),
           "s": torch.tensor(2.0), "inf": float("-inf")}
    out = jsonable(obj)
    assert out == {"1": None, "t": [1.5, None], "p": "/x/y", "n": [1, True, None], "s": 2.0, "inf": None}
    json.dumps(out, allow_nan=False)
    clamped = jsonable(obj, clamp_inf=True)
    assert clamped["t"] == [1.5, INF_AS] and clamped["inf"] == -INF_AS and clamped["1"] is None


@pytest.mark.parametrize("a, b, same", [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct", True),
    ("/models/SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct", True),
    ("openai-community/gpt2", "gpt2", True),
    ("gpt2", "gpt2-medium", False),
    ("Qwen/Qwen1.5-0.5B-Chat", "Qwen/Qwen1.5-1.8B-Chat", False),
    ("", "gpt2", False),
])
def test_one_model_identity_rule(a, b, same):
    assert same_model_name(a, b) is same and same_model_name(b, a) is same


def test_sae_compatibility_uses_the_same_identity_as_the_evaluation():
    """The GGUF file name and the hub id of one model are the same model for the SAE check too (they disagreed)."""
    sae = StandardSAE(SAEModelConfig(d_in=8, d_sae=16, metadata={"model_name": "SmolLM2-135M-Instruct.Q4_1.gguf",
                                                                  "hook_name": "blocks.0.hook_mlp_out"}))
    check_compatible(sae, d_in=8, model_name="HuggingFaceTB/SmolLM2-135M-Instruct", hook_name="blocks.0.hook_mlp_out")
    with pytest.raises(SAECompatibilityError, match="gpt2"):
        check_compatible(sae, d_in=8, model_name="gpt2")


def test_hub_offline_reason(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE" in hf.hub_offline_reason(timeout_s=0.5) and not hf.hub_reachable(0.5)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("MY_OFFLINE", "yes")
    assert "MY_OFFLINE" in hf.hub_offline_reason(0.5, ("HF_HUB_OFFLINE", "MY_OFFLINE"))
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.invalid:8080")
    seen = []

    def refuse(addr, timeout=None):
        seen.append((addr, timeout))
        raise OSError("refused")

    monkeypatch.setattr(socket, "create_connection", refuse)
    reason = hf.hub_offline_reason(timeout_s=0.5)
    assert "mirror.invalid:8080" in reason and "refused" in reason and seen == [(("mirror.invalid", 8080), 0.5)]


def test_max_context_reads_the_config():
    assert hf.max_context(make_tiny_model("llama", vocab_size=64)) == 512
    assert hf.max_context(torch.nn.Linear(2, 2)) is None


def test_as_module_unwraps_a_loaded_model_but_never_a_module():
    model = make_tiny_model("llama", vocab_size=64)
    lm = LoadedModel(model=model, tokenizer="tok", name="t", source="mem", family="llama")
    assert as_module(lm) is model and tokenizer_of(lm) == "tok"
    assert as_module(model) is model and tokenizer_of(model) is None  # an HF LM's own .model is not unwrapped


def test_chunked_reading_keeps_training_positions_in_stream_order():
    seqs = [(torch.arange(4) + 10 * i, torch.tensor([0, 1, 2, -1])) for i in range(3)]
    it = iter(seqs)
    ids, segs = read_sequences(it, 2)
    assert ids.tolist() == [[0, 1, 2, 3], [10, 11, 12, 13]]
    rest = read_sequences(it, 2)
    assert rest[0].shape == (1, 4) and read_sequences(it, 2) is None

    def fn(x):  # activation = the token id, width 2
        return torch.stack([x.float(), -x.float()], -1)

    kept, mask = kept_activations(fn, ids, segs, d_in=2, exclude_special=True)
    assert kept[:, 0].tolist() == [1, 2, 11, 12] and mask.sum() == 4  # not SPECIAL (0), not PAD (-1)
    kept, _ = kept_activations(fn, ids, segs, d_in=None, exclude_special=False)
    assert kept[:, 0].tolist() == [0, 1, 2, 10, 11, 12]
    with pytest.raises(ActivationSourceError, match="expected"):
        kept_activations(fn, ids, segs, d_in=3, exclude_special=True)
    with pytest.raises(ValueError, match="d_in=3"):
        kept_activations(fn, ids, segs, d_in=3, exclude_special=True, error=ValueError)


def test_one_error_hierarchy_without_a_registry(capsys):
    for cls in (ConfigError, DataError, AnalysisError, ReportError, StudyError):
        assert issubclass(cls, errors.UserError)
    assert not hasattr(errors, "user_error_types")
    assert main(["compare", "/no/such/study.yaml"]) == 2  # a ConfigError: one paragraph, no traceback
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and "Traceback" not in err


def test_activation_sources_implement_the_protocol(tmp_path):
    from domain_sae.activations import ActivationSource, ActivationStore, CachedActivationSource, MixtureSource
    from training_helpers import write_cache
    seqs = [(torch.arange(8), torch.ones(8, dtype=torch.int8)) for _ in range(4)]

    def fn(x):
        return torch.randn(*x.shape, 3, generator=torch.Generator().manual_seed(0))

    store = ActivationStore(fn, seqs, d_in=3, batch_size=4, buffer_tokens=8, model_batch_size=2)
    rows = fn(torch.stack([s[0] for s in seqs]))[:, :4].reshape(16, 3)
    cache = CachedActivationSource(write_cache(tmp_path / "c", rows, torch.zeros(16), torch.ones(16), shard_tokens=8),
                                   batch_size=4, buffer_tokens=8)
    for src in (store, cache, MixtureSource(store, cache)):
        assert isinstance(src, ActivationSource)
    assert not isinstance(seqs, ActivationSource)
    assert MixtureSource(store, cache).next_batch().shape == (8, 3)
