"""Steering: patch arithmetic, identity at strength 0, ablation orthogonality, greedy generation and CE change on
a tiny random Llama, each checked against an independent computation (plain forward + our own torch hooks)."""

from __future__ import annotations

import json
import types

import pytest
import torch

from conftest import make_tiny_model
from domain_sae.analysis import (AnalysisError, ce_change, generate_with_patch, next_token_ce, random_direction_like,
                                 steer_patch, steering_sweep)
from domain_sae.models import hooks


VOCAB, D = 101, 32
HOOK = "blocks.0.hook_resid_post"  # output of decoder layer 0 == input of layer 1


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama", vocab_size=VOCAB, d_model=D)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (3, 12), generator=g)
    segs = torch.ones(3, 12, dtype=torch.int8)
    segs[:, 0] = 0  # BOS-like special
    segs[1, 5] = 0  # a template marker in the middle
    segs[2, 9:] = -1  # tail padding
    segs[0, 0] = -1  # a left PAD: the pair (0, 1) must not count although token 1 is text
    return ids, segs


def _direction(seed=1):
    return torch.randn(D, generator=torch.Generator().manual_seed(seed))


def _layer0_output_hook(model, fn):
    """Independent patch: a forward hook on layer 0 that replaces its hidden-state output by fn(output)."""
    def hook(_m, _inp, out):
        if isinstance(out, tuple):
            return (fn(out[0]),) + tuple(out[1:])
        return fn(out)
    return model.model.layers[0].register_forward_hook(hook)


def _manual_ce(logits, ids, segs):
    counted = (segs[:, :-1] != -1) & (segs[:, 1:] != -1) & (segs[:, 1:] != 0)
    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    nll = -lp.gather(2, ids[:, 1:, None])[..., 0]
    return float(nll[counted].sum() / counted.sum())


def test_patch_arithmetic():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 5, D, generator=g)
    v = _direction()
    u = v / v.norm()
    assert torch.allclose(steer_patch(v, 1.5)(a), a + 1.5 * v)
    assert torch.allclose(steer_patch(v, 1.5, unit_norm=True)(a), a + 1.5 * u, atol=1e-6)
    abl = steer_patch(v, 1.0, "ablate")(a)
    assert torch.allclose(abl @ u, torch.zeros(2, 5), atol=1e-5)
    assert torch.allclose(abl, a - (a @ u)[..., None] * u, atol=1e-6)
    half = steer_patch(v, 0.5, "ablate")(a)
    assert torch.allclose(half @ u, 0.5 * (a @ u), atol=1e-5)
    for mode in ("add", "ablate"):
        assert torch.equal(steer_patch(v, 0.0, mode)(a), a)
    bf = steer_patch(v, 2.0)(a.bfloat16())
    assert bf.dtype == torch.bfloat16
    with pytest.raises(AnalysisError, match="width"):
        steer_patch(v[:5], 1.0)(a)
    with pytest.raises(AnalysisError, match="mode"):
        steer_patch(v, 1.0, "clamp")
    with pytest.raises(AnalysisError, match="zero"):
        steer_patch(torch.zeros(D), 1.0, "ablate")


def test_random_direction_like():
    v = _direction() * 3
    r1 = random_direction_like(v, torch.Generator().manual_seed(5))
    r2 = random_direction_like(v, torch.Generator().manual_seed(5))
    assert torch.equal(r1, r2) and r1.dtype == v.dtype and r1.shape == v.shape
    assert float(r1.norm()) == pytest.approx(float(v.norm()), rel=1e-5)
    assert abs(torch.nn.functional.cosine_similarity(r1, v, dim=0)) < 0.9


@pytest.mark.parametrize("mode,name", [("add", HOOK), ("ablate", HOOK), ("add", "blocks.1.hook_resid_pre"),
                                       ("ablate", "blocks.0.hook_mlp_out")])
def test_strength_zero_leaves_logits_unchanged(model, batch, mode, name):
    ids, _ = batch
    hook = hooks.resolve_hook(model, name)
    with torch.no_grad():
        clean = model(input_ids=ids).logits
        patched = hooks.forward_with_patch(model, hook, ids, steer_patch(_direction(), 0.0, mode))
    assert torch.allclose(clean, patched, atol=1e-6)


def test_ablation_makes_the_hooked_activation_orthogonal(model, batch):
    ids, _ = batch
    hook = hooks.resolve_hook(model, HOOK)
    v = _direction(3)
    u = v / v.norm()
    a = hooks.capture(model, hook, ids)  # the unpatched activation
    seen = []

    def record(_m, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    h = model.model.layers[1].register_forward_pre_hook(record, with_kwargs=True)
    try:
        hooks.forward_with_patch(model, hook, ids, steer_patch(v, 1.0, "ablate"))
    finally:
        h.remove()
    received = seen[0]
    assert torch.allclose(received @ u, torch.zeros(received.shape[:2]), atol=1e-5)
    assert torch.allclose(received, a - (a @ u)[..., None] * u, atol=1e-5)
    assert (a @ u).abs().max() > 1e-2  # there was something to remove


def test_ce_change_vs_manual(model, batch):
    ids, segs = batch
    v = _direction(4)
    strength = 3.0
    attn = (segs != -1).long()
    with torch.no_grad():
        clean_ref = _manual_ce(model(input_ids=ids, attention_mask=attn).logits, ids, segs)
        h = _layer0_output_hook(model, lambda o: o + strength * v)
        try:
            patched_ref = _manual_ce(model(input_ids=ids, attention_mask=attn).logits, ids, segs)
        finally:
            h.remove()
    clean, n = next_token_ce(model, HOOK, ids, segs, batch_size=2)
    # 33 pairs minus: PAD source [0, 0]; SPECIAL target [1, 5]; PAD targets [2, 9:]. BOS sources [1:, 0] count.
    assert n == 33 - 1 - 1 - 3
    assert clean == pytest.approx(clean_ref, abs=1e-5)
    delta = ce_change(model, HOOK, ids, segs, steer_patch(v, strength), batch_size=2)
    assert delta == pytest.approx(patched_ref - clean_ref, abs=1e-5)
    assert abs(delta) > 1e-4
    assert ce_change(model, HOOK, ids, segs, steer_patch(v, 0.0)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(AnalysisError, match="no countable"):
        next_token_ce(model, HOOK, ids, torch.zeros_like(segs))


class _DigitTok:
    eos_token_id = 0

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i == 0))


def _manual_greedy(model, prompt, n, fn=None):
    ids = prompt[None]
    h = _layer0_output_hook(model, fn) if fn is not None else None
    try:
        with torch.no_grad():
            for _ in range(n):
                nxt = model(input_ids=ids).logits[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], 1)
    finally:
        if h is not None:
            h.remove()
    return ids[0, len(prompt):]


def test_generate_with_patch_matches_manual_greedy_loop(model):
    prompt = torch.tensor([5, 17, 42, 8])
    v = _direction(6)
    got0 = generate_with_patch(model, HOOK, prompt, steer_patch(v, 0.0), 6, return_ids=True, stop_at_eos=False)
    assert torch.equal(got0, _manual_greedy(model, prompt, 6))
    got = generate_with_patch(model, HOOK, prompt, steer_patch(v, 8.0), 6, return_ids=True, stop_at_eos=False)
    assert torch.equal(got, _manual_greedy(model, prompt, 6, lambda o: o + 8.0 * v))
    text = generate_with_patch(model, HOOK, prompt, steer_patch(v, 8.0), 6, tokenizer=_DigitTok(),
                               stop_at_eos=False)
    assert text == _DigitTok().decode(got.tolist(), skip_special_tokens=True)
    # a LoadedModel-like wrapper supplies its tokenizer; EOS (id 0 here) would stop generation early
    wrapped = types.SimpleNamespace(model=model, tokenizer=_DigitTok())
    assert generate_with_patch(wrapped, HOOK, prompt, steer_patch(v, 8.0), 6, stop_at_eos=False) == text
    with pytest.raises(AnalysisError, match="tokenizer"):
        generate_with_patch(model, HOOK, prompt, None, 2)



@pytest.mark.parametrize("mode,strength", [("add", 8.0), ("ablate", 1.0)])
def test_generation_with_kv_cache_equals_full_reforward(model, mode, strength):
    """The cached path feeds one token per step; a position-wise patch gives the same tokens as re-running the whole
    sequence (the manual loop above re-runs it with a plain forward hook)."""
    prompt = torch.tensor([9, 3, 77, 21, 4])
    v = _direction(11)
    patch = steer_patch(v, strength, mode)
    cached = generate_with_patch(model, HOOK, prompt, patch, 8, return_ids=True, stop_at_eos=False)
    full = generate_with_patch(model, HOOK, prompt, patch, 8, return_ids=True, stop_at_eos=False, kv_cache=False)
    assert torch.equal(cached, full)
    assert torch.equal(cached, _manual_greedy(model, prompt, 8, lambda o: patch(o)))


def test_generation_falls_back_to_full_forwards_for_a_model_without_a_cache(model):
    class NoCache(torch.nn.Module):  # forward(input_ids, attention_mask=None, use_cache=False): no cache argument
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)

    prompt = torch.tensor([5, 17, 42, 8])
    v = _direction(12)
    # blocks.0.hook_resid_post of the inner model, as a module path of the wrapper
    got = generate_with_patch(NoCache(model), "inner.model.layers.0", prompt, steer_patch(v, 8.0), 5, return_ids=True,
                              stop_at_eos=False)
    assert torch.equal(got, _manual_greedy(model, prompt, 5, lambda o: o + 8.0 * v))

def test_steering_sweep_is_json_ready(model, batch):
    ids, segs = batch
    v = _direction(7)
    res = steering_sweep(model, HOOK, {"latent": v, "random": random_direction_like(v, torch.Generator())},
                         [0.0, 4.0], {"a": (ids[:2], segs[:2]), "b": (ids[2:], segs[2:])},
                         prompts=[torch.tensor([3, 4, 5])], max_new_tokens=2, tokenizer=_DigitTok())
    json.dumps(res)
    assert len(res["generations"]["clean"]) == 1 and set(res["generations"]["latent"]) == {"0.0", "4.0"}
    assert set(res["ce_change"]) == {"latent", "random"}
    assert res["ce_change"]["latent"]["a"][0] == pytest.approx(0.0, abs=1e-6)
    assert res["ce_change"]["latent"]["b"][1] == pytest.approx(
        ce_change(model, HOOK, ids[2:], segs[2:], steer_patch(v, 4.0)), abs=1e-6)
