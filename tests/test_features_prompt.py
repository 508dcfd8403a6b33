"""Prompt-page metrics against independent computations on the tiny Llama: activation, quantile (np.interp in
the percentile table), direct logit effect (final RMSNorm input read by a separate hook), the ablation loss
change (a manual single-latent ablation with forward_with_patch, one batch per step) and the live test of one
latent; prompt validation (types, limits, chat roles) without a tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from feature_helpers import HOOK, make_sae

from domain_sae.features.prompt import (
    MAX_PROMPT_CHARS,
    PromptError,
    ablation_batches,
    ablation_effects,
    analyse_prompt,
    check_prompt_input,
    latent_trace,
    quantiles,
    rank_ablation,
    tokenize_prompt,
)
from domain_sae.models.hooks import forward_with_patch, resolve_hook


def _table(d_sae: int, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    t = np.sort(g.gamma(2.0, 0.2, size=(d_sae, 101)).astype(np.float32), axis=1)
    t[3] = np.nan   # a latent that never fired in the store
    return t


def test_quantile_interpolation_matches_numpy():
    table = _table(8)
    vals = torch.tensor([0.01, 0.3, 0.5, 5.0, 0.2], dtype=torch.float32)
    lats = torch.tensor([0, 1, 2, 4, 3])
    got = quantiles(vals, lats, table).numpy()
    grid = np.linspace(0, 1, 101)
    for k in range(4):
        assert got[k] == pytest.approx(np.interp(vals[k].item(), table[lats[k]], grid), abs=1e-5)
    assert np.isnan(got[4])


@torch.no_grad()
def test_prompt_metrics_match_independent_computation(tiny_lm):
    sae = make_sae(3)
    table = _table(sae.d_sae)
    ids, segs = tokenize_prompt(tiny_lm.tokenizer, "def f(x):\n    return x + 1  # café")
    res, state = analyse_prompt(tiny_lm, sae, HOOK, ids, segs, table, top_n=5)
    model = tiny_lm.model
    hp = resolve_hook(model, HOOK)
    x = torch.tensor([ids])
    seen = {}
    h1 = model.model.norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[0]))

    def grab(a):
        seen["a"] = a.clone()
        return a
    logits = forward_with_patch(model, hp, x, grab)
    h1.remove()
    f = sae.encode(seen["a"][0])
    rms = torch.sqrt(seen["h"][0].pow(2).mean(-1) + model.config.rms_norm_eps)
    g = model.model.norm.weight
    W_U = model.lm_head.weight
    ce = F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="none")
    assert "".join(t["text"] for t in res["tokens"]) == tiny_lm.tokenizer.decode(ids)
    for t, tok in enumerate(res["tokens"]):
        top = torch.topk(f[t], 5)
        want = [(int(i), float(v)) for i, v in zip(top.indices, top.values) if v > 0]
        assert [e["latent"] for e in tok["activation"]] == [w[0] for w in want]
        assert np.allclose([e["value"] for e in tok["activation"]], [w[1] for w in want], rtol=1e-5)
        if t == len(ids) - 1:
            assert tok["logit"] == [] and tok["next_ce"] is None
            continue
        assert tok["next_ce"] == pytest.approx(float(ce[t]), rel=1e-5)
        dla = f[t] * ((sae.W_dec * g) @ W_U[ids[t + 1]]) / rms[t]
        for e in tok["logit"]:
            assert e["value"] == pytest.approx(float(dla[e["latent"]]), rel=1e-4, abs=1e-6)
        if tok["logit"]:
            active = torch.nonzero(f[t] > 0).flatten()
            assert abs(tok["logit"][0]["value"]) == pytest.approx(float(dla[active].abs().max()), rel=1e-4)
        for e in tok["quantile"]:
            v = float(f[t, e["latent"]])
            assert e["value"] == pytest.approx(np.interp(v, table[e["latent"]], np.linspace(0, 1, 101)), abs=1e-5)

    capped, _ = analyse_prompt(tiny_lm, sae, HOOK, ids, segs, table, top_n=5, max_candidates=7)
    assert len(capped["candidates"]) == 7 and set(capped["candidates"]) <= set(res["candidates"])
    firsts = {tok["activation"][0]["latent"] for tok in res["tokens"] if tok["activation"]}
    assert len(firsts) > 7 or firsts <= set(capped["candidates"])   # rank-0 latents come first
    effects = ablation_effects(tiny_lm, sae, HOOK, state, batch_size=4)
    assert set(effects) == set(res["candidates"])
    for latent in res["candidates"][:3]:
        d = sae.W_dec[latent]
        patched = forward_with_patch(model, hp, x, lambda a, latent=latent, d=d: a - f[:, latent, None][None] * d)
        manual = F.cross_entropy(patched[0, :-1], x[0, 1:], reduction="none") - ce
        assert torch.allclose(effects[latent], manual, atol=1e-5)
    ranked = rank_ablation(effects, state, top_n=3)
    for t in range(len(ids) - 1):
        col = {k: float(v[t]) for k, v in effects.items()}
        best = sorted(col, key=lambda k: -abs(col[k]))[:3]
        assert [e["latent"] for e in ranked[t]] == [k for k in best if col[k] != 0.0]


def test_prompt_validation(tiny_lm):
    tok = tiny_lm.tokenizer
    for kwargs, msg in [({"text": ""}, "empty"), ({"text": "x" * (MAX_PROMPT_CHARS + 1)}, "limit"),
                        ({"text": 5}, "string"), ({}, "exactly one"), ({"messages": "hi"}, "list"),
                        ({"messages": [{"role": "user"}]}, "list")]:
        with pytest.raises(PromptError, match=msg):
            tokenize_prompt(tok, kwargs.get("text"), kwargs.get("messages"))
    ids, segs = tokenize_prompt(tok, messages=[{"role": "user", "content": "hello"},
                                               {"role": "assistant", "content": "hi!"}])
    assert "<|im_start|>" in tok.decode(ids) and 2 in segs and 3 in segs
    for messages, msg in [([{"role": "<script>", "content": "x"}], "the roles are user, assistant, system"),
                          ([{"role": "user", "content": "  "}], "empty")]:
        with pytest.raises(PromptError, match=msg):
            tokenize_prompt(tok, messages=messages)
        with pytest.raises(PromptError, match=msg):
            check_prompt_input(None, messages)   # the same check, without a tokenizer


@torch.no_grad()
def test_live_trace_is_the_prompt_pages_activation(tiny_lm):
    """latent_trace: the SAE's own activation of one latent on every token (independently: sae.encode of the hook
    activation of a full forward), its quantile by np.interp in the latent's table where active, and the same
    values the prompt page lists for that latent."""
    sae = make_sae(3)
    table = _table(sae.d_sae)
    ids, segs = tokenize_prompt(tiny_lm.tokenizer, "Hello there! def f(x): return x  # naïve")
    res, _ = analyse_prompt(tiny_lm, sae, HOOK, ids, segs, table, top_n=sae.d_sae)
    seen = {}
    forward_with_patch(tiny_lm.model, resolve_hook(tiny_lm.model, HOOK), torch.tensor([ids]),
                       lambda a: seen.setdefault("a", a.clone()))
    f = sae.encode(seen["a"][0])
    firing = torch.nonzero(f.max(0).values > 0).flatten().tolist()
    assert firing
    for latent in firing[:4] + [3]:
        tr = latent_trace(tiny_lm, sae, HOOK, ids, segs, latent, table)
        assert [t["text"] for t in tr["tokens"]] == [t["text"] for t in res["tokens"]]
        for t, tok in enumerate(tr["tokens"]):
            assert tok["activation"] == pytest.approx(float(f[t, latent]), rel=1e-5, abs=1e-6)
            listed = {e["latent"]: e["value"] for e in res["tokens"][t]["activation"]}
            if f[t, latent] > 0:
                assert tok["activation"] == pytest.approx(listed[latent], rel=1e-6)
                want = None if latent == 3 else np.interp(float(f[t, latent]), table[latent], np.linspace(0, 1, 101))
                assert tok["quantile"] == (None if want is None else pytest.approx(want, abs=1e-5))
            else:
                assert latent not in listed and tok["quantile"] is None


@torch.no_grad()
def test_ablation_runs_one_batch_per_step(tiny_lm):
    sae = make_sae(3)
    ids, segs = tokenize_prompt(tiny_lm.tokenizer, "def f(x):\n    return x + 1")
    _, state = analyse_prompt(tiny_lm, sae, HOOK, ids, segs, _table(sae.d_sae), max_candidates=10)
    out = {}
    steps = ablation_batches(tiny_lm, sae, HOOK, state, out, batch_size=4)
    assert next(steps) == (4, 10) and len(out) == 4
    assert list(steps) == [(8, 10), (10, 10)] and sorted(out) == state.candidates
    full = ablation_effects(tiny_lm, sae, HOOK, state, batch_size=3)
    assert all(torch.allclose(out[k], full[k], atol=1e-6) for k in full)
