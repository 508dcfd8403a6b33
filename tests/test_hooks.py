"""Hook resolution, truncated capture and patching, checked against the models' own hidden states."""

import time

import pytest
import torch

from conftest import make_tiny_model
from domain_sae.models.hooks import (HookError, capture, forward_with_capture, forward_with_patch, hook_d_in,
                                     resolve_hook)
from domain_sae.models.load import ModelLoadError, load_model

FAMILIES = ["llama", "qwen2", "mistral", "gpt2", "gpt_neox"]


@pytest.fixture(params=FAMILIES)
def model_and_ids(request):
    torch.manual_seed(0)
    return make_tiny_model(request.param, vocab_size=128), torch.randint(0, 128, (2, 9))


def test_residual_hooks_match_output_hidden_states(model_and_ids):
    model, ids = model_and_ids
    hs = model(ids, output_hidden_states=True).hidden_states
    for L in range(2):
        torch.testing.assert_close(capture(model, resolve_hook(model, f"blocks.{L}.hook_resid_pre"), ids), hs[L])
    # the last layer's hidden_states entry has the final norm applied, so compare resid_post below the top layer
    torch.testing.assert_close(capture(model, resolve_hook(model, "blocks.0.hook_resid_post"), ids), hs[1])


def test_mlp_and_attn_out_equal_module_outputs(model_and_ids):
    model, ids = model_and_ids
    seen = {}
    hp_mlp = resolve_hook(model, "blocks.1.hook_mlp_out")
    hp_attn = resolve_hook(model, "blocks.1.hook_attn_out")
    mods = dict(model.named_modules())
    h1 = mods[hp_mlp.module_path].register_forward_hook(lambda m, a, o: seen.__setitem__("mlp", o))
    h2 = mods[hp_attn.module_path].register_forward_hook(lambda m, a, o: seen.__setitem__("attn", o[0]))
    model(ids)
    h1.remove(), h2.remove()
    torch.testing.assert_close(capture(model, hp_mlp, ids), seen["mlp"])
    torch.testing.assert_close(capture(model, hp_attn, ids), seen["attn"])
    assert hook_d_in(model, hp_mlp) == 32


def test_resid_mid_is_resid_pre_plus_attention():
    model, ids = make_tiny_model("llama", vocab_size=128), torch.randint(0, 128, (1, 6))
    pre = capture(model, resolve_hook(model, "blocks.1.hook_resid_pre"), ids)
    attn = capture(model, resolve_hook(model, "blocks.1.hook_attn_out"), ids)
    mid = capture(model, resolve_hook(model, "blocks.1.hook_resid_mid"), ids)
    torch.testing.assert_close(mid, pre + attn)


def test_capture_stops_after_the_hooked_layer():
    model, ids = make_tiny_model("llama", vocab_size=128), torch.randint(0, 128, (1, 5))
    fired = []
    h = model.model.layers[1].register_forward_hook(lambda *a: fired.append(1))
    capture(model, resolve_hook(model, "blocks.0.hook_mlp_out"), ids)
    assert fired == []
    model(ids)
    assert fired == [1]
    h.remove()


def test_patch_identity_zero_and_capture(model_and_ids):
    model, ids = model_and_ids
    hp = resolve_hook(model, "blocks.0.hook_mlp_out")
    clean = model(ids).logits
    logits, act = forward_with_capture(model, hp, ids)
    torch.testing.assert_close(logits, clean)
    torch.testing.assert_close(act, capture(model, hp, ids))
    torch.testing.assert_close(forward_with_patch(model, hp, ids, lambda a: a), clean)
    zero = forward_with_patch(model, hp, ids, torch.zeros_like)
    assert not torch.allclose(zero, clean)
    # independent computation: zero the MLP output with a hand-written hook
    mods = dict(model.named_modules())
    h = mods[hp.module_path].register_forward_hook(lambda m, a, o: torch.zeros_like(o))
    torch.testing.assert_close(zero, model(ids).logits)
    h.remove()
    # hooks are removed afterwards
    torch.testing.assert_close(model(ids).logits, clean)


def test_patching_resid_pre_input():
    model, ids = make_tiny_model("gpt2", vocab_size=128), torch.randint(0, 128, (1, 5))
    hp = resolve_hook(model, "blocks.1.hook_resid_pre")
    a = capture(model, hp, ids)
    doubled = forward_with_patch(model, hp, ids, lambda x: 2 * x)
    assert not torch.allclose(doubled, model(ids).logits)
    torch.testing.assert_close(capture(model, resolve_hook(model, "blocks.0.hook_resid_post"), ids), a)


def test_module_path_names_work():
    model = make_tiny_model("gpt2", vocab_size=128)
    hp = resolve_hook(model, "transformer.h.0.mlp")
    assert hp.kind == "output" and hp == resolve_hook(model, "transformer.h.0.mlp")
    assert resolve_hook(model, "blocks.0.hook_mlp_out").module_path == "transformer.h.0.mlp"


@pytest.mark.parametrize("name", ["blocks.7.hook_mlp_out", "blocks.0.hook_mlp_output", "model.layers.0.mlpp"])
def test_wrong_names_list_valid_ones(name):
    model = make_tiny_model("llama", vocab_size=128)
    with pytest.raises(HookError, match="Valid names: blocks.L"):
        resolve_hook(model, name)


def test_parallel_residual_has_no_resid_mid():
    model = make_tiny_model("gpt_neox", vocab_size=128)
    assert model.config.use_parallel_residual
    with pytest.raises(HookError, match="parallel residual"):
        resolve_hook(model, "blocks.0.hook_resid_mid")


def test_local_directory_loads(tmp_path, smol_tokenizer):
    model = make_tiny_model("llama")
    model.save_pretrained(tmp_path)
    smol_tokenizer.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path))
    assert lm.family == "llama" and lm.tokenizer.pad_token_id is not None
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(lm.model(ids).logits, model(ids).logits)


def test_uncached_hub_id_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.monotonic()
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache.*smollm2-135m-instruct"):
        load_model("someone/definitely-not-cached-model-xyz")
    assert time.monotonic() - t < 30


def test_bad_paths_are_explained(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path))


@pytest.mark.slow
def test_real_offline_model_hooks(smol_lm):
    model = smol_lm.model
    assert smol_lm.family == "llama"
    hp = resolve_hook(model, "blocks.0.hook_mlp_out")
    assert hook_d_in(model, hp) == 576
    ids = smol_lm.tokenizer("def f(x):\n    return x + 1", return_tensors="pt").input_ids
    hs = model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(capture(model, resolve_hook(model, "blocks.3.hook_resid_pre"), ids), hs[3])
    torch.testing.assert_close(capture(model, resolve_hook(model, "blocks.3.hook_resid_post"), ids), hs[4])
