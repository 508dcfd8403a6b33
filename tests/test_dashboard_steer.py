"""Steering and the live test through the HTTP API (tiny in-process Llama), against independent computations:
greedy continuations by full forwards without a KV cache, the prompt's next-token loss by a float64 log-softmax,
the clamp as a + (c - f_i(a)) d_i from sae.encode, clamp-to-0 equal to the prompt page's ablation, the live test
equal to sae.encode of the hook activation; bounds, cancellation (by id, within one step) and superseding."""

from __future__ import annotations

import threading

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from dashboard_helpers import build_store, greedy, prompt_ce, tiny_model, wait_job
from fastapi.testclient import TestClient
from feature_helpers import HOOK, make_sae

from domain_sae.dashboard.app import create_app
from domain_sae.dashboard.worker import INTERACTIVE
from domain_sae.features.prompt import PromptError, ablation_effects, analyse_prompt, tokenize_prompt
from domain_sae.features.queries import FeatureStore
from domain_sae.features.steer import continuation_prompt, steer_latent, steer_steps
from domain_sae.models.hooks import resolve_hook

TEXT = "Hello there! How are you doing today?"


@pytest.fixture(scope="module")
def env(smol_tokenizer, tmp_path_factory):
    lm = tiny_model(smol_tokenizer)
    sae = make_sae(7)
    path = build_store(tmp_path_factory.mktemp("steer"), lm, {"general": sae})
    app = create_app(path, lm=lm, saes={"general": sae}, ablation_batch=4)
    store = FeatureStore(path)
    firing = [i for i in range(sae.d_sae) if (store.feature(None, i)["max_act"] or 0) > 0]
    return {"c": TestClient(app), "app": app, "lm": lm, "sae": sae, "store": store, "latent": firing[0],
            "hp": resolve_hook(lm.model, HOOK)}


def _steer(env, **body) -> dict:
    r = env["c"].post("/api/steer", json={"text": TEXT, **body})
    assert r.status_code == 200, r.text
    j = wait_job(env["c"].get, r.json()["job"])
    assert j["status"] == "done", j
    return j["result"]


@torch.no_grad()
def test_add_steering_equals_full_forward_greedy_and_loss(env):
    lm, sae, hp, latent = env["lm"], env["sae"], env["hp"], env["latent"]
    res = _steer(env, latent=latent, mode="add", strength=6, max_new_tokens=12)
    unit = env["store"].feature(None, latent)["max_act"]
    assert res["unit"] == pytest.approx(unit) and res["value"] == pytest.approx(6 * unit)
    ids, _ = tokenize_prompt(lm.tokenizer, TEXT)
    d = sae.W_dec[latent].detach()

    def add(a):
        return a + 6 * unit * d
    assert res["clean"]["ids"] == greedy(lm.model, hp, ids, None, 12)
    assert res["steered"]["ids"] == greedy(lm.model, hp, ids, add, 12)
    assert res["steered"]["ids"] != res["clean"]["ids"]
    assert res["steered"]["text"] == "".join(res["steered"]["texts"])
    clean, steered = prompt_ce(lm.model, hp, ids, None), prompt_ce(lm.model, hp, ids, add)
    assert res["loss"]["targets"] == len(ids) - 1       # BOS predicts the first token; nothing predicts a BOS
    assert res["loss"]["clean"] == pytest.approx(float(clean.mean()), abs=1e-5)
    assert res["loss"]["delta"] == pytest.approx(float(steered.mean() - clean.mean()), abs=1e-5)


@torch.no_grad()
def test_clamp_steering_and_clamp_to_zero_is_the_ablation(env):
    lm, sae, hp, latent = env["lm"], env["sae"], env["hp"], env["latent"]
    ids, segs = tokenize_prompt(lm.tokenizer, TEXT)
    unit = env["store"].feature(None, latent)["max_act"]
    d = sae.W_dec[latent].detach()

    def clamp(a, c=3 * unit):
        return a + (c - sae.encode(a)[..., latent])[..., None] * d
    res = _steer(env, latent=latent, mode="clamp", strength=3, max_new_tokens=10)
    assert res["steered"]["ids"] == greedy(lm.model, hp, ids, clamp, 10)
    want = prompt_ce(lm.model, hp, ids, clamp).mean() - prompt_ce(lm.model, hp, ids, None).mean()
    assert res["loss"]["delta"] == pytest.approx(float(want), abs=1e-5)
    # clamping to 0 removes f_i d_i at every position: the prompt page's ablation of that latent, averaged
    zero = _steer(env, latent=latent, mode="clamp", strength=0, max_new_tokens=1)
    _, state = analyse_prompt(lm, sae, HOOK, ids, segs, env["store"].quantile_table(None))
    state.candidates = [latent]
    ablation = ablation_effects(lm, sae, HOOK, state)[latent]
    assert zero["loss"]["delta"] == pytest.approx(float(ablation.double().mean()), abs=1e-5)
    assert zero["loss"]["delta"] != 0.0


@torch.no_grad()
def test_live_test_equals_the_sae_activation(env):
    lm, sae, latent = env["lm"], env["sae"], env["latent"]
    r = env["c"].post("/api/live", json={"text": TEXT, "latent": latent})
    assert r.status_code == 200
    res = r.json()
    ids, _ = tokenize_prompt(lm.tokenizer, TEXT)
    from domain_sae.models.hooks import capture
    f = sae.encode(capture(lm.model, env["hp"], torch.tensor([ids]))[0])[:, latent]
    assert [t["id"] for t in res["tokens"]] == ids and res["sae"] == "general"
    assert [t["activation"] for t in res["tokens"]] == pytest.approx(f.tolist(), rel=1e-5, abs=1e-6)
    qs = [t["quantile"] for t in res["tokens"]]
    assert all((q is None) == (float(v) == 0.0) for q, v in zip(qs, f)) and any(q is not None for q in qs)
    assert all(q is None or 0.0 <= q <= 1.0 for q in qs)


def test_steering_bounds_and_a_latent_that_never_fired(env):
    lm, sae = env["lm"], env["sae"]
    ids, segs = tokenize_prompt(lm.tokenizer, TEXT)
    with pytest.raises(PromptError, match="never fired"):
        steer_latent(lm, sae, HOOK, ids, segs, 0, mode="add", strength=1, unit=0.0)
    with pytest.raises(PromptError, match="between -10 and 10"):
        steer_latent(lm, sae, HOOK, ids, segs, 0, mode="add", strength=11, unit=1.0)
    with pytest.raises(PromptError, match="max_new_tokens"):
        steer_latent(lm, sae, HOOK, ids, segs, 0, mode="clamp", strength=1, unit=1.0, max_new_tokens=65)


def test_cancel_stops_within_one_token(env):
    """check() runs before every forward step: cancelling after k steps leaves exactly k ticks."""
    lm, sae = env["lm"], env["sae"]
    ids, segs = tokenize_prompt(lm.tokenizer, TEXT)
    ticks = []

    class Stop(Exception):
        pass

    def check():
        if len(ticks) >= 7:
            raise Stop
    gen = steer_steps(lm, sae, HOOK, ids, segs, env["latent"], mode="add", strength=2, unit=1.0,
                      max_new_tokens=20, check=check, tick=lambda: ticks.append(1))
    with pytest.raises(Stop):
        for _ in gen:
            pass
    assert len(ticks) == 7   # 2 loss forwards + 5 generated tokens, then nothing more


def test_steer_job_cancelled_by_id_and_superseded(env):
    """A blocker holds the worker; a steering job queued behind it is cancelled by DELETE (it never runs), a
    second one is superseded by a third, which runs."""
    c, worker = env["c"], env["app"].state.worker
    release = threading.Event()

    def blocker(task):
        release.wait(30)
        yield INTERACTIVE
    worker.submit("blocker", blocker)
    body = {"text": TEXT, "latent": env["latent"], "max_new_tokens": 4}
    first = c.post("/api/steer", json=body).json()["job"]
    assert c.delete(f"/api/job/{first}").json()["cancelling"] is True
    second = c.post("/api/steer", json=body).json()["job"]
    third = c.post("/api/steer", json=body).json()["job"]
    release.set()
    for job, status in ((first, "cancelled"), (second, "cancelled"), (third, "done")):
        j = wait_job(c.get, job)
        assert j["status"] == status, (job, j)
    assert wait_job(c.get, first)["done"] == 0 and wait_job(c.get, third)["done"] > 0


def test_a_chat_prompt_is_continued_as_the_assistant(env):
    """A chat ending with a user message gets the generation prompt (the assistant's header); one ending with an
    assistant message is continued inside it (no end-of-turn before the continuation)."""
    tok = env["lm"].tokenizer
    ask = [{"role": "user", "content": "Add two numbers?"}]
    ids, segs = tokenize_prompt(tok, messages=ask)
    gen, gsegs = continuation_prompt(tok, ids, segs, ask)
    assert gen[:len(ids)] == ids and tok.decode(gen).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(gen) == tok.apply_chat_template(ask, tokenize=False, add_generation_prompt=True)
    assert set(gsegs[len(ids):]) <= {0, 4}
    reply = ask + [{"role": "assistant", "content": "def add(a, b):"}]
    ids, segs = tokenize_prompt(tok, messages=reply)
    cont, _ = continuation_prompt(tok, ids, segs, reply)
    assert tok.decode(cont).endswith("<|im_start|>assistant\ndef add(a, b):") and cont == ids[:len(cont)]
    r = env["c"].post("/api/steer", json={"messages": ask, "latent": env["latent"], "max_new_tokens": 2})
    assert wait_job(env["c"].get, r.json()["job"])["result"]["prompt_tokens"] == len(gen)
