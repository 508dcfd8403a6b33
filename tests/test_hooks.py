"""Hook resolution, truncated capture and patching, checked against the models' own hidden states and against
sub-modules called by hand."""

import dataclasses

import pytest
import torch
from torch import nn

from conftest import make_tiny_model
from domain_sae.models.hooks import (HookError, HookPoint, capture, forward_with_capture, forward_with_patch,
                                     hook_d_in, list_hook_names, resolve_hook)

FAMILIES = ["llama", "qwen2", "mistral", "gpt2", "gpt_neox"]
N_LAYERS = 3
VOCAB = 128


def _extra_model(family: str):
    """Tiny models of families beyond conftest's five (sandwich norms, other parallel-residual layouts)."""
    import transformers as tf
    torch.manual_seed(0)
    small = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if family == "gemma2":
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(head_dim=8, **small)).eval()
    if family == "olmo2":
        return tf.Olmo2ForCausalLM(tf.Olmo2Config(**small)).eval()
    if family == "gpt_neox_sequential":
        cfg = tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
                               num_attention_heads=4, max_position_embeddings=128, use_parallel_residual=False)
        return tf.GPTNeoXForCausalLM(cfg).eval()
    if family == "gptj":
        cfg = tf.GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=N_LAYERS, n_head=4, rotary_dim=4, n_positions=128)
        return tf.GPTJForCausalLM(cfg).eval()
    raise ValueError(family)


SEQUENTIAL = ["llama", "qwen2", "mistral", "gpt2", "gemma2", "olmo2", "gpt_neox_sequential"]
PARALLEL = ["gpt_neox", "gptj"]


def _model(family: str):
    if family in FAMILIES:
        return make_tiny_model(family, vocab_size=VOCAB, n_layers=N_LAYERS)
    return _extra_model(family)


def _cap(model, name, ids, **kw):
    return capture(model, resolve_hook(model, name), ids, **kw)


@pytest.fixture(params=FAMILIES)
def model_and_ids(request):
    torch.manual_seed(1)
    return make_tiny_model(request.param, vocab_size=VOCAB, n_layers=N_LAYERS), torch.randint(0, VOCAB, (2, 9))


# ---------------------------------------------------------------------------------------------------------------
# Values

@pytest.mark.parametrize("family", FAMILIES + ["gemma2", "olmo2", "gpt_neox_sequential", "gptj"])
def test_residual_hooks_match_output_hidden_states(family):
    model, ids = _model(family), torch.randint(0, VOCAB, (2, 7))
    hs = model(ids, output_hidden_states=True).hidden_states
    assert len(hs) == N_LAYERS + 1
    for L in range(N_LAYERS):
        torch.testing.assert_close(_cap(model, f"blocks.{L}.hook_resid_pre", ids), hs[L])
    # the last hidden_states entry has the final norm applied, so resid_post is compared below the top layer
    for L in range(N_LAYERS - 1):
        torch.testing.assert_close(_cap(model, f"blocks.{L}.hook_resid_post", ids), hs[L + 1])


@pytest.mark.parametrize("family", SEQUENTIAL)
def test_residual_decomposition_sequential(family):
    """resid_mid = resid_pre + attn_out and resid_post = resid_mid + mlp_out, in every layer."""
    model, ids = _model(family), torch.randint(0, VOCAB, (2, 6))
    for L in range(N_LAYERS):
        pre, attn, mid, mlp, post = (_cap(model, f"blocks.{L}.{k}", ids) for k in
                                     ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out",
                                      "hook_resid_post"))
        torch.testing.assert_close(mid, pre + attn)
        torch.testing.assert_close(post, mid + mlp)


@pytest.mark.parametrize("family", PARALLEL)
def test_residual_decomposition_parallel(family):
    """Parallel residual: resid_post = resid_pre + attn_out + mlp_out, and there is no resid_mid."""
    model, ids = _model(family), torch.randint(0, VOCAB, (2, 6))
    for L in range(N_LAYERS):
        pre, attn, mlp, post = (_cap(model, f"blocks.{L}.{k}", ids) for k in
                                ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post"))
        torch.testing.assert_close(post, pre + attn + mlp)
    with pytest.raises(HookError, match="parallel residual"):
        resolve_hook(model, "blocks.0.hook_resid_mid")
    assert not any(n.endswith("hook_resid_mid") for n in list_hook_names(model))


def test_mlp_out_equals_mlp_called_by_hand(model_and_ids):
    """mlp_out of layer L = mlp(second_norm(resid_mid)), with the sub-modules called directly."""
    model, ids = model_and_ids
    family = model.config.model_type
    layers = {"gpt2": model.transformer.h if family == "gpt2" else None}.get(family)
    if layers is None:
        layers = model.gpt_neox.layers if family == "gpt_neox" else model.model.layers
    norm2 = {"gpt2": "ln_2"}.get(family, "post_attention_layernorm")
    for L in range(N_LAYERS):
        block = layers[L]
        if getattr(model.config, "use_parallel_residual", False):  # both sub-blocks read the layer input
            x = block.post_attention_layernorm(_cap(model, f"blocks.{L}.hook_resid_pre", ids))
        else:
            x = getattr(block, norm2)(_cap(model, f"blocks.{L}.hook_resid_mid", ids))
        with torch.no_grad():
            expected = block.mlp(x)
        torch.testing.assert_close(_cap(model, f"blocks.{L}.hook_mlp_out", ids), expected)


def test_attn_out_and_module_paths_equal_module_outputs(model_and_ids):
    model, ids = model_and_ids
    mods = dict(model.named_modules())
    seen = {}
    hp_mlp, hp_attn = resolve_hook(model, "blocks.1.hook_mlp_out"), resolve_hook(model, "blocks.1.hook_attn_out")
    h1 = mods[hp_mlp.module_path].register_forward_hook(lambda m, a, o: seen.__setitem__("mlp", o))
    h2 = mods[hp_attn.module_path].register_forward_hook(lambda m, a, o: seen.__setitem__("attn", o[0]))
    with torch.no_grad():
        model(ids)
    h1.remove(), h2.remove()
    torch.testing.assert_close(capture(model, hp_mlp, ids), seen["mlp"])
    torch.testing.assert_close(capture(model, hp_attn, ids), seen["attn"])
    # the module path itself is a valid name with the same value
    torch.testing.assert_close(_cap(model, hp_attn.module_path, ids), seen["attn"])
    assert hook_d_in(model, hp_mlp) == hook_d_in(model, hp_attn) == 32


def test_resolved_hook_points():
    gpt2, neox, llama = (make_tiny_model(f, vocab_size=VOCAB) for f in ("gpt2", "gpt_neox", "llama"))
    assert resolve_hook(gpt2, "blocks.1.hook_resid_mid") == HookPoint("blocks.1.hook_resid_mid", "transformer.h.1.ln_2",
                                                                      "input", 1)
    assert resolve_hook(gpt2, "blocks.0.hook_attn_out").module_path == "transformer.h.0.attn"
    assert resolve_hook(neox, "blocks.1.hook_mlp_out") == HookPoint("blocks.1.hook_mlp_out",
                                                                    "gpt_neox.layers.1.mlp", "output", 1)
    assert resolve_hook(llama, "blocks.0.hook_resid_pre") == HookPoint("blocks.0.hook_resid_pre", "model.layers.0",
                                                                       "input", 0)
    assert resolve_hook(llama, "blocks.1.hook_resid_post").kind == "output"
    assert resolve_hook(llama, "model.layers.0.mlp") == HookPoint("model.layers.0.mlp", "model.layers.0.mlp",
                                                                  "output", None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolve_hook(llama, "model.layers.0.mlp").name = "x"


def test_capture_with_attention_mask_matches_hidden_states():
    model = make_tiny_model("llama", vocab_size=VOCAB, n_layers=N_LAYERS)
    ids = torch.randint(0, VOCAB, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding in the first row
    hs = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    torch.testing.assert_close(_cap(model, "blocks.1.hook_resid_post", ids, attention_mask=mask), hs[2])
    logits, act = forward_with_capture(model, resolve_hook(model, "blocks.1.hook_resid_pre"), ids,
                                       attention_mask=mask)
    torch.testing.assert_close(act, hs[1])
    torch.testing.assert_close(logits, model(ids, attention_mask=mask).logits)


# ---------------------------------------------------------------------------------------------------------------
# Truncation

def test_capture_stops_after_the_hooked_module():
    model, ids = make_tiny_model("llama", vocab_size=VOCAB, n_layers=N_LAYERS), torch.randint(0, VOCAB, (1, 5))
    fired = []
    handles = [model.model.layers[1].register_forward_hook(lambda *a: fired.append("layer1")),
               model.model.layers[0].self_attn.register_forward_hook(lambda *a: fired.append("attn0")),
               model.model.layers[0].post_attention_layernorm.register_forward_hook(lambda *a: fired.append("ln0")),
               model.lm_head.register_forward_hook(lambda *a: fired.append("head"))]
    capture(model, resolve_hook(model, "blocks.0.hook_mlp_out"), ids)
    assert fired == ["attn0", "ln0"]          # earlier modules ran, nothing after layer 0's MLP did
    fired.clear()
    capture(model, resolve_hook(model, "blocks.0.hook_resid_mid"), ids)
    assert fired == ["attn0"]                 # stops before the norm itself runs
    fired.clear()
    with torch.no_grad():
        model(ids)
    assert fired == ["attn0", "ln0", "layer1", "head"]
    for h in handles:
        h.remove()


def test_capture_has_no_grad_and_leaves_no_hooks():
    model, ids = make_tiny_model("gpt2", vocab_size=VOCAB), torch.randint(0, VOCAB, (1, 4))
    model.requires_grad_(True)
    a = _cap(model, "blocks.0.hook_resid_mid", ids)
    assert not a.requires_grad
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ---------------------------------------------------------------------------------------------------------------
# Patching

def test_patch_identity_zero_and_manual(model_and_ids):
    model, ids = model_and_ids
    hp = resolve_hook(model, "blocks.0.hook_mlp_out")
    with torch.no_grad():
        clean = model(ids).logits
    logits, act = forward_with_capture(model, hp, ids)
    torch.testing.assert_close(logits, clean)
    torch.testing.assert_close(act, capture(model, hp, ids))
    torch.testing.assert_close(forward_with_patch(model, hp, ids, lambda a: a), clean)
    zero = forward_with_patch(model, hp, ids, torch.zeros_like)
    assert not torch.allclose(zero, clean)
    # independent computation: zero the MLP output with a hand-written hook
    h = dict(model.named_modules())[hp.module_path].register_forward_hook(lambda m, a, o: torch.zeros_like(o))
    with torch.no_grad():
        manual = model(ids).logits
    h.remove()
    torch.testing.assert_close(zero, manual)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, clean)  # hooks are gone


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_patch_resid_pre_equals_running_the_rest_by_hand(family):
    """Patching resid_pre of the last layer with 2*a equals the logits of the last layer + final norm + head
    applied to 2*a by hand."""
    model, ids = make_tiny_model(family, vocab_size=VOCAB, n_layers=2), torch.randint(0, VOCAB, (1, 5))
    hp = resolve_hook(model, "blocks.1.hook_resid_pre")
    a = capture(model, hp, ids)
    patched = forward_with_patch(model, hp, ids, lambda x: 2 * x)
    seen = {}

    def replace(mod, args, kwargs):  # same substitution written independently
        seen["n"] = seen.get("n", 0) + 1
        if args:
            return (2 * args[0],) + args[1:], kwargs
        return args, {**kwargs, "hidden_states": 2 * kwargs["hidden_states"]}

    layer = model.transformer.h[1] if family == "gpt2" else model.model.layers[1]
    h = layer.register_forward_pre_hook(replace, with_kwargs=True)
    with torch.no_grad():
        manual = model(ids).logits
    h.remove()
    assert seen["n"] == 1
    torch.testing.assert_close(patched, manual)
    assert not torch.allclose(patched, model(ids).logits)
    torch.testing.assert_close(_cap(model, "blocks.0.hook_resid_post", ids), a)


def test_patch_hooks_removed_on_error():
    model, ids = make_tiny_model("llama", vocab_size=VOCAB), torch.randint(0, VOCAB, (1, 4))
    hp = resolve_hook(model, "blocks.0.hook_resid_pre")

    def boom(a):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        forward_with_patch(model, hp, ids, boom)
    with pytest.raises(HookError, match=r"returned \(1, 4, 16\), expected a tensor of shape \(1, 4, 32\)"):
        forward_with_patch(model, hp, ids, lambda a: a[..., :16])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    torch.testing.assert_close(forward_with_patch(model, hp, ids, lambda a: a), model(ids).logits)


# ---------------------------------------------------------------------------------------------------------------
# A family the code has never heard of: keyword hidden_states, unknown child names, no config

class _ToyBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attention, self.ln2, self.ffn = nn.Linear(d, d), nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, hidden_states):
        h = hidden_states + self.attention(hidden_states)
        return (h + self.ffn(self.ln2(h)),)


class _ToyLM(nn.Module):
    def __init__(self, d=8, vocab=11, n=3):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.blocks, self.head = nn.Embedding(vocab, d), nn.ModuleList(_ToyBlock(d) for _ in range(n)), \
            nn.Linear(d, vocab)
        self.side = nn.ModuleList([nn.Linear(d, d)])  # a shorter ModuleList the search must not pick

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        h = self.embed(input_ids)
        for block in self.blocks:
            h = block(hidden_states=h)[0]  # passed as a keyword
        return type("Out", (), {"logits": self.head(h)})()


def test_generic_fallback_and_keyword_hidden_states():
    model, ids = _ToyLM(), torch.randint(0, 11, (2, 5))
    names = list_hook_names(model)
    assert names[:5] == [f"blocks.0.{k}" for k in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid",
                                                     "hook_mlp_out", "hook_resid_post")]
    assert len(names) == 15
    assert resolve_hook(model, "blocks.2.hook_resid_mid") == HookPoint("blocks.2.hook_resid_mid", "blocks.2.ln2",
                                                                       "input", 2)
    with torch.no_grad():
        h0 = model.embed(ids)
        h1 = model.blocks[0](h0)[0]
        mid1 = h1 + model.blocks[1].attention(h1)
    torch.testing.assert_close(_cap(model, "blocks.1.hook_resid_pre", ids), h1)
    torch.testing.assert_close(_cap(model, "blocks.1.hook_resid_mid", ids), mid1)
    torch.testing.assert_close(_cap(model, "blocks.0.hook_resid_post", ids), h1)
    # patching an input passed by keyword: zeroing resid_pre of layer 1 == running layers 1.. on zeros by hand
    with torch.no_grad():
        h = torch.zeros_like(h1)
        for block in model.blocks[1:]:
            h = block(h)[0]
        manual = model.head(h)
    torch.testing.assert_close(forward_with_patch(model, resolve_hook(model, "blocks.1.hook_resid_pre"), ids,
                                                  torch.zeros_like), manual)
    assert hook_d_in(model, resolve_hook(model, "blocks.0.hook_mlp_out")) == 8


# ---------------------------------------------------------------------------------------------------------------
# Errors and listing

@pytest.mark.parametrize("name", ["blocks.7.hook_mlp_out", "blocks.0.hook_mlp_output", "model.layers.0.mlpp",
                                  "resid_pre", ""])
def test_wrong_names_list_valid_ones(name):
    model = make_tiny_model("llama", vocab_size=VOCAB)
    with pytest.raises(HookError, match=r"Valid names for this llama model: blocks\.L\.\{hook_resid_pre, "
                                        r"hook_attn_out, hook_resid_mid, hook_mlp_out, hook_resid_post\} with L in "
                                        r"0\.\.1 .*any module path") as e:
        resolve_hook(model, name)
    assert isinstance(e.value, ValueError)
    if name == "blocks.7.hook_mlp_out":
        assert "model has 2 layers" in str(e.value)


def test_misspelt_names_get_suggestions():
    model = make_tiny_model("gpt2", vocab_size=VOCAB)
    with pytest.raises(HookError, match=r"Did you mean blocks\.1\.hook_resid_post"):
        resolve_hook(model, "blocks.1.hook_resid_pots")
    with pytest.raises(HookError, match=r"Did you mean transformer\.h\.0\.mlp"):
        resolve_hook(model, "transformer.h.0.mpl")


def test_hook_from_another_model_is_explained():
    hp = resolve_hook(make_tiny_model("gpt2", vocab_size=VOCAB), "blocks.0.hook_mlp_out")
    with pytest.raises(HookError, match="transformer.h.0.mlp"):
        capture(make_tiny_model("llama", vocab_size=VOCAB), hp, torch.zeros(1, 2, dtype=torch.long))


def test_list_hook_names():
    llama = make_tiny_model("llama", vocab_size=VOCAB)
    names = list_hook_names(llama)
    assert len(names) == 2 * 5 and names[0] == "blocks.0.hook_resid_pre" and names[-1] == "blocks.1.hook_resid_post"
    for n in names:
        resolve_hook(llama, n)
    hinted = list_hook_names(llama, with_hint=True)
    assert hinted[:-1] == names and "any module path" in hinted[-1] and "model.layers.0" in hinted[-1]
    assert len(list_hook_names(make_tiny_model("gpt_neox", vocab_size=VOCAB))) == 2 * 4  # no resid_mid


# ---------------------------------------------------------------------------------------------------------------
# The real offline model

@pytest.mark.slow
def test_real_offline_model_hooks(smol_lm):
    model = smol_lm.model
    assert smol_lm.family == "llama" and len(list_hook_names(model)) == 30 * 5
    hp = resolve_hook(model, "blocks.0.hook_mlp_out")
    assert hp.module_path == "model.layers.0.mlp" and hook_d_in(model, hp) == 576
    ids = smol_lm.tokenizer("def f(x):\n    return x + 1", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    hs = out.hidden_states
    for L in (0, 3, 15, 29):
        torch.testing.assert_close(_cap(model, f"blocks.{L}.hook_resid_pre", ids), hs[L])
    for L in (3, 28):
        torch.testing.assert_close(_cap(model, f"blocks.{L}.hook_resid_post", ids), hs[L + 1])
    mid = _cap(model, "blocks.3.hook_resid_mid", ids)
    torch.testing.assert_close(mid, hs[3] + _cap(model, "blocks.3.hook_attn_out", ids))
    torch.testing.assert_close(hs[4], mid + _cap(model, "blocks.3.hook_mlp_out", ids))
    logits, act = forward_with_capture(model, resolve_hook(model, "blocks.15.hook_resid_post"), ids)
    torch.testing.assert_close(logits, out.logits)
    torch.testing.assert_close(act, hs[16])
    torch.testing.assert_close(forward_with_patch(model, hp, ids, lambda a: a), out.logits)
