"""The dashboard's HTTP surface (FastAPI TestClient, tiny in-process model): JSON equals the store, errors are
JSON with messages, no path traversal, text from data is never emitted as markup, the static export, and the
prompt endpoint's ablation job equals a manual single-latent ablation."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient
from feature_helpers import HOOK, PLANTED, finetuned_copy, heldout_sets, make_sae

from domain_sae.dashboard.app import create_app
from domain_sae.dashboard.export import export_site
from domain_sae.dashboard.pages import embed_json
from domain_sae.features.build import build_feature_store
from domain_sae.features.options import FeatureOptions
from domain_sae.features.queries import FeatureStore
from domain_sae.models.hooks import forward_with_patch, resolve_hook


@pytest.fixture(scope="module")
def env(smol_tokenizer, tmp_path_factory):
    from conftest import make_tiny_model

    from domain_sae.models.load import LoadedModel
    lm = LoadedModel(make_tiny_model("llama"), smol_tokenizer, "tiny-llama", "in-process", "llama")
    tmp = tmp_path_factory.mktemp("dash")
    parent = make_sae(1)
    child = finetuned_copy(parent, 2, str(tmp / "general"))
    out = build_feature_store([tmp / "general", tmp / "general_chat"], ["chat", "code"], 192, tmp / "f.sqlite",
                              lm=lm, saes=[parent, child], heldout=heldout_sets(smol_tokenizer),
                              options=FeatureOptions(top_k=6, top_k_per_dataset=4, window_before=6,
                                                     window_after=3), write=None)
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
                "/api/prompt/nojob", "/api/nothing"]:
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
    assert c.get("/assets/app.js").status_code == 200


def test_prompt_errors_are_json(env):
    c = env["client"]
    cases = [({"text": ""}, "empty"), ({"text": "x" * 5000}, "limit"), ({"text": 3}, "string"),
             ({"messages": [{"role": 1}]}, "list"), ({"prompt": "hi"}, "Unknown field"), ([1, 2], "object")]
    for body, msg in cases:
        r = c.post("/api/prompt", json=body)
        assert r.status_code == 400 and msg in r.json()["error"], body
    r = c.post("/api/prompt", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    assert c.post("/api/prompt", json={"text": "hi there", "sae": "nope"}).status_code == 404


@torch.no_grad()
def test_prompt_ablation_job_equals_manual_ablation(env):
    c, lm, sae = env["client"], env["lm"], env["saes"][0]
    r = c.post("/api/prompt", json={"text": "Hello there, how are you?", "sae": "general"})
    assert r.status_code == 200
    res = r.json()
    assert set(res["metrics"]) == {"activation", "quantile", "logit", "ablation"}
    for _ in range(200):
        j = c.get(f"/api/prompt/{res['job']}").json()
        if j["status"] in ("done", "error"):
            break
        time.sleep(0.05)
    assert j["status"] == "done" and j["done"] == j["total"] == len(res["candidates"])
    ids = torch.tensor([[t["id"] for t in res["tokens"]]])
    hp = resolve_hook(lm.model, HOOK)
    store = {}
    clean = forward_with_patch(lm.model, hp, ids, lambda a: store.setdefault("a", a.clone()))
    ce = F.cross_entropy(clean[0, :-1], ids[0, 1:], reduction="none")
    f = sae.encode(store["a"][0])
    checked = 0
    for t, entries in enumerate(j["ablation"][:-1]):
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


def test_newer_prompt_job_supersedes_older_one():
    import threading

    from domain_sae.dashboard.jobs import JobRunner
    runner = JobRunner(threading.Lock())
    seen = []

    def slow(progress):
        for i in range(40):
            time.sleep(0.01)
            progress(i + 1, 40)
            seen.append(i)
        return "ok"
    a = runner.submit(40, slow)
    time.sleep(0.05)
    b = runner.submit(40, slow)
    for _ in range(300):
        if runner.get(b)["status"] == "done":
            break
        time.sleep(0.01)
    assert runner.get(a)["status"] == "cancelled" and runner.get(a)["done"] < 40
    assert runner.get(b) == {**runner.get(b), "status": "done", "done": 40, "total": 40, "result": "ok"}
    assert runner.get("nope") is None
