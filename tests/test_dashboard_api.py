"""The dashboard's HTTP surface (FastAPI TestClient, tiny in-process model): JSON equals the store, errors are
JSON with messages, no path traversal, text from data is never emitted as markup, the static export, request
bodies refused before any model work (also on a cold server), and the prompt endpoint's ablation job equals a
manual single-latent ablation."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient
from dashboard_helpers import build_store, tiny_model, wait_job
from feature_helpers import HOOK, PLANTED, finetuned_copy, make_sae

from domain_sae.dashboard.app import create_app
from domain_sae.dashboard.export import export_site
from domain_sae.dashboard.pages import embed_json
from domain_sae.features.prompt import MAX_PROMPT_CHARS
from domain_sae.features.queries import FeatureStore
from domain_sae.models.hooks import forward_with_patch, resolve_hook


@pytest.fixture(scope="module")
def env(smol_tokenizer, tmp_path_factory):
    lm = tiny_model(smol_tokenizer)
    tmp = tmp_path_factory.mktemp("dash")
    parent = make_sae(1)
    child = finetuned_copy(parent, 2, str(tmp / "general"))
    out = build_store(tmp, lm, {"general": parent, "general_chat": child})
    app = create_app(out, lm=lm, saes={"general": parent, "general_chat": child}, ablation_batch=4)
    return {"client": TestClient(app), "store": FeatureStore(out), "path": out, "lm": lm, "saes": [parent, child],
            "tmp": tmp}


def test_api_matches_store(env):
    c, st = env["client"], env["store"]
    r = c.get("/api/features", params={"sae": "general_chat", "sort": "max_act", "order": "desc", "per_page": 7,
                                       "page": 1})
    assert r.status_code == 200
    assert r.json() == st.list_features("general_chat", sort="max_act", per_page=7, page=1)
    maxes = sorted((st.feature(1, i)["max_act"] for i in range(48)), reverse=True)
    assert [row["max_act"] for row in r.json()["rows"]] == maxes[7:14]
    f = c.get("/api/feature/5", params={"sae": "general"}).json()
    assert f["density"] == st.feature("general", 5)["density"]
    assert f["top"] == st.feature("general", 5)["top"]
    assert c.get("/api/store").json()["datasets"][1]["spec"] == "code"
    cmp_ = c.get("/api/compare", params={"a": "general", "b": "general_chat"}).json()
    assert cmp_["parent"] == "general" and len(cmp_["rotated"]) == 48
    flipped = c.get("/api/compare", params={"a": "general_chat", "b": "general"}).json()
    assert {(p["a"], p["b"]) for p in flipped["pairs"]} == {(p["b"], p["a"]) for p in cmp_["pairs"]}


def test_errors_are_404_or_400_with_messages(env):
    c = env["client"]
    for url in ["/api/feature/48", "/api/feature/-1", "/api/feature/abc", "/api/features?sae=missing",
                "/api/job/nojob", "/api/nothing"]:
        r = c.get(url)
        assert r.status_code == 404, url
        assert r.json()["error"]
    assert c.get("/feature/4800").status_code == 404
    assert "no latent 4800" in c.get("/feature/4800").text
    assert c.get("/api/features", params={"sort": "drop table"}).status_code == 400
    for bad in ["/assets/../features/schema.py", "/assets/%2e%2e%2fapp.py", "/assets/..%2F..%2Fcli.py",
                "/assets/pages.py", "/../../etc/passwd", "/assets//etc/passwd"]:
        r = c.get(bad)
        assert r.status_code == 404, bad
        assert "SCHEMA_SQL" not in r.text and "root:" not in r.text
    assert c.get("/assets/app.js").status_code == 200 and c.get("/assets/panels.js").status_code == 200
    assert c.delete("/api/job/nojob").status_code == 404


BAD_PROMPTS = [({"text": ""}, "empty"), ({"text": "x" * (MAX_PROMPT_CHARS + 1)}, "limit"), ({"text": 3}, "string"),
               ({"messages": [{"role": 1}]}, "list"), ({"prompt": "hi"}, "Unknown field"), ([1, 2], "object"),
               ({"text": "hi", "messages": [{"role": "user", "content": "hi"}]}, "exactly one"),
               ({"messages": [{"role": "user", "content": "hi"}, {"role": "<script>", "content": "x"}]},
                "Message 2 has role '<script>'; the roles are user, assistant, system."),
               ({"messages": [{"role": "tool", "content": "x"}]}, "the roles are user, assistant, system"),
               ({"messages": [{"role": "user", "content": "x", "name": "y"}]}, "only role and content")]


def test_prompt_errors_are_json(env):
    c = env["client"]
    for body, msg in BAD_PROMPTS:
        for endpoint, extra in (("prompt", {}), ("steer", {"latent": 1}), ("live", {"latent": 1})):
            r = c.post(f"/api/{endpoint}", json={**body, **extra} if isinstance(body, dict) else body)
            assert r.status_code == 400 and msg in r.json()["error"], (endpoint, body)
    r = c.post("/api/prompt", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    assert c.post("/api/prompt", json={"text": "hi there", "sae": "nope"}).status_code == 404
    for body, msg in [({"latent": 48}, "no latent 48"), ({"latent": "3"}, "integer"), ({"latent": True}, "integer"),
                      ({}, "integer"), ({"latent": 1, "mode": "boost"}, "add, clamp"),
                      ({"latent": 1, "strength": 10.5}, "between -10 and 10"),
                      ({"latent": 1, "strength": "big"}, "number"),
                      ({"latent": 1, "max_new_tokens": 65}, "between 1 and 64"),
                      ({"latent": 1, "max_new_tokens": 2.5}, "integer")]:
        r = c.post("/api/steer", json={"text": "hi there", **body})
        assert r.status_code == 400 and msg in r.json()["error"], body
    r = c.post("/api/live", json={"text": "hi there", "latent": -1})
    assert r.status_code == 400 and "no latent -1" in r.json()["error"]


def test_bad_bodies_answer_at_once_on_a_cold_server(env):
    """No model loaded yet (it would load on the first valid request): every bad body is refused without loading it;
    a server started without a model refuses a valid request at once, naming --no-model."""
    app = create_app(env["path"])
    c = TestClient(app)
    t0 = time.perf_counter()
    for body, msg in BAD_PROMPTS:
        assert msg in c.post("/api/prompt", json=body).json()["error"]
    assert c.post("/api/steer", json={"text": "hi", "latent": 1, "strength": 99}).status_code == 400
    assert c.post("/api/live", json={"text": 12345, "latent": 1}).status_code == 400
    assert time.perf_counter() - t0 < 5
    assert app.state.models.lm is None and app.state.models.saes == {}
    assert app.state.worker.tasks == {}
    off = TestClient(create_app(env["path"], load_model=False))
    for endpoint in ("prompt", "steer", "live"):
        r = off.post(f"/api/{endpoint}", json={"text": "hi there", "latent": 1} if endpoint != "prompt" else
                     {"text": "hi there"})
        assert r.status_code == 400 and "--no-model" in r.json()["error"]


@torch.no_grad()
def test_prompt_ablation_job_equals_manual_ablation(env):
    c, lm, sae = env["client"], env["lm"], env["saes"][0]
    r = c.post("/api/prompt", json={"text": "Hello there, how are you?", "sae": "general"})
    assert r.status_code == 200
    res = r.json()
    assert set(res["metrics"]) == {"activation", "quantile", "logit", "ablation"}
    j = wait_job(c.get, res["job"])
    assert j["status"] == "done" and j["done"] == j["total"] == len(res["candidates"]) and j["kind"] == "prompt"
    ids = torch.tensor([[t["id"] for t in res["tokens"]]])
    hp = resolve_hook(lm.model, HOOK)
    store = {}
    clean = forward_with_patch(lm.model, hp, ids, lambda a: store.setdefault("a", a.clone()))
    ce = F.cross_entropy(clean[0, :-1], ids[0, 1:], reduction="none")
    f = sae.encode(store["a"][0])
    checked = 0
    for t, entries in enumerate(j["result"][:-1]):
        for e in entries[:1]:
            patched = forward_with_patch(lm.model, hp, ids, lambda a, e=e: a - f[:, e["latent"], None][None] *
                                         sae.W_dec[e["latent"]])
            manual = F.cross_entropy(patched[0, :-1], ids[0, 1:], reduction="none") - ce
            assert e["value"] == pytest.approx(float(manual[t]), abs=1e-5)
            checked += 1
    assert checked >= 3


def test_text_from_data_is_escaped_everywhere(env):
    c, st = env["client"], env["store"]
    hits = st.list_features("general", q="<script>", per_page=500)["rows"]
    assert hits, "the planted script tag is in some latent's top contexts"
    latent = hits[0]["latent"]
    assert "<script>" in "".join(t for e in st.feature("general", latent)["top"] for t in e["texts"])
    page = c.get(f"/feature/{latent}", params={"sae": "general"}).text
    assert "window.__pwned" not in page and "onerror" not in page
    assert "'self'" in c.get("/").headers["content-security-policy"]
    s = embed_json({"t": PLANTED + "</script>"})
    assert "<" not in s and ">" not in s and "&" not in s
    out = export_site(env["path"], env["tmp"] / "site", write=None)
    pages = list(out.rglob("*.html"))
    assert len(pages) == 2 * 48 + 3
    for p in pages:
        text = p.read_text()
        assert "<script>window" not in text and "<img" not in text and "</b>" not in text
    feature_page = out / "feature" / "0" / f"{latent}.html"
    assert feature_page.stat().st_size < 200_000
    assert "\\u003c" in feature_page.read_text()  # the planted markup is there as inert, escaped data
