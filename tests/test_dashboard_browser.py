"""Browser tests: Playwright drives the system Chromium through list -> feature -> prompt -> comparison, checks
that the numbers shown equal the stored ones, that all four prompt metric columns fill in, that a `<script>`
planted in a dataset (and typed into a prompt) never runs, and saves screenshots; opens every page of the server
and of a static export for a store with one SAE, two SAEs and a fine-tuned pair and fails on any JavaScript error,
console error or dialog; drives the steering and live-test panels (tiny model, and the offline default model
SmolLM2-135M-Instruct end to end)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.browser
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

if not os.path.exists(CHROMIUM):
    pytest.skip("no system Chromium at /usr/bin/chromium (make test installs it)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")

from dashboard_helpers import build_store, store_kinds, tiny_model  # noqa: E402 (after the Chromium check)
from feature_helpers import HOOK, PLANTED, finetuned_copy, make_sae  # noqa: E402 (after the Chromium check)

from domain_sae.dashboard.app import create_app  # noqa: E402 (after the Chromium check)
from domain_sae.dashboard.export import export_site  # noqa: E402 (after the Chromium check)
from domain_sae.dashboard.serve import BackgroundServer  # noqa: E402 (after the Chromium check)
from domain_sae.evaluation import HeldoutData, SAESet  # noqa: E402 (after the Chromium check)
from domain_sae.features.build import build_feature_store  # noqa: E402 (after the Chromium check)
from domain_sae.features.prompt import latent_trace, tokenize_prompt  # noqa: E402 (after the Chromium check)
from domain_sae.features.queries import FeatureStore  # noqa: E402 (after the Chromium check)
from domain_sae.features.steer import steer_latent  # noqa: E402 (after the Chromium check)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def _shots(tmp_path: Path) -> Path:
    d = Path(os.environ.get("DSAE_SCREENSHOT_DIR") or tmp_path)
    d.mkdir(parents=True, exist_ok=True)
    return d


def _num(text: str) -> float:
    return float(text.strip())


class Watch:
    """Every JavaScript error, console error and dialog of a page (dialogs are dismissed and recorded)."""

    def __init__(self, page):
        self.problems: list[str] = []
        page.on("pageerror", lambda e: self.problems.append(f"{page.url}: page error {e}"))
        page.on("console", lambda m: m.type == "error" and self.problems.append(f"{page.url}: console {m.text}"))

        def dialog(d):
            self.problems.append(f"{page.url}: dialog {d.message}")
            d.dismiss()
        page.on("dialog", dialog)


def _rendered(page) -> None:
    """Wait until the page's script has drawn it (the data it fetches included): body[data-ready]."""
    page.wait_for_selector("body[data-ready='1']", state="attached")


def _never_ran(page) -> None:
    assert page.evaluate("() => window.__pwned === undefined"), "a planted script ran"
    assert page.query_selector_all("main img") == []


def test_navigation_numbers_prompt_and_planted_script(browser, smol_tokenizer, tmp_path):
    lm = tiny_model(smol_tokenizer)
    parent = make_sae(1)
    child = finetuned_copy(parent, 2, str(tmp_path / "general"))
    path = build_store(tmp_path, lm, {"general": parent, "general_chat": child}, window_before=8, window_after=4)
    store = FeatureStore(path)
    shots = _shots(tmp_path)
    app = create_app(path, lm=lm, saes={"general": parent, "general_chat": child}, ablation_batch=8)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    watch = Watch(page)
    with BackgroundServer(app) as url:
        # feature list: the first row is the densest latent, with its stored numbers
        page.goto(url + "/")
        page.wait_for_selector("#feature-table tbody tr")
        want = store.list_features("general", sort="density", per_page=50)["rows"]
        rows = page.query_selector_all("#feature-table tbody tr")
        assert len(rows) == len(want) == 48
        first = rows[0].query_selector_all("td")
        assert first[0].inner_text() == f"#{want[0]['latent']}"
        assert _num(first[1].inner_text()) == pytest.approx(want[0]["density"], rel=1e-3)
        assert _num(first[3].inner_text()) == pytest.approx(want[0]["max_act"], rel=1e-3)
        page.screenshot(path=str(shots / "dashboard_list.png"), full_page=True)
        # search for the planted markup and open the first hit
        page.fill("#search", "script")
        page.wait_for_function("() => document.querySelector('#page-info') && "
                               "!document.querySelector('#page-info').textContent.includes(' 48 latents')")
        hits = store.list_features("general", q="script")["rows"]
        assert hits
        page.click(f"#feature-table a[data-latent='{hits[0]['latent']}']")
        page.wait_for_selector("#stat-density")
        feat = store.feature("general", hits[0]["latent"])
        shown = page.get_attribute("#stat-density .num", "data-value")
        assert float(shown) == feat["density"]
        assert _num(page.inner_text("#stat-max")) == pytest.approx(feat["max_act"], rel=1e-3)
        assert len(page.query_selector_all("#top-examples .example")) == len(feat["top"])
        values = [float(e.get_attribute("data-value")) for e in page.query_selector_all("#top-examples .example")]
        assert values == [e["value"] for e in feat["top"]]
        text = page.inner_text("main")
        assert "script" in text and "<" in text   # the markup is shown as text
        _never_ran(page)
        page.screenshot(path=str(shots / "dashboard_feature.png"), full_page=True)
        # prompt page: all four columns, ablation fills in; a typed script does not run either
        page.goto(url + "/prompt")
        page.wait_for_selector("#prompt-text")
        page.fill("#prompt-text", "Hello there! " + PLANTED + "\n    def f(x):\n        return x")
        with page.expect_response("**/api/prompt") as resp:
            page.click("#prompt-go")
        res = resp.value.json()
        page.wait_for_selector("#col-activation li")
        page.wait_for_function("() => document.querySelector('#ablation-status').textContent.includes('done')",
                               timeout=60_000)
        for col in ("#col-activation", "#col-quantile", "#col-logit", "#col-ablation"):
            assert page.query_selector(col) is not None
        sel = int(page.get_attribute("#prompt-tokens .tok.sel", "data-index"))
        first_act = float(page.get_attribute("#col-activation li .num", "data-value"))
        assert first_act == res["tokens"][sel]["activation"][0]["value"]
        assert page.query_selector_all("#col-ablation li") or "none" in page.inner_text("#col-ablation")
        page.click("#prompt-tokens .tok[data-index='2']")
        assert page.inner_text("#token-title").startswith("Token 2")
        _never_ran(page)
        page.screenshot(path=str(shots / "dashboard_prompt.png"), full_page=True)
        # comparison page
        page.goto(url + "/compare")
        page.wait_for_selector("#matched-fraction")
        cmp_ = store.compare()
        assert float(page.get_attribute("#matched-fraction .num", "data-value")) == cmp_["matched_fraction"]
        assert len(page.query_selector_all("#pairs tbody tr")) == len(cmp_["pairs"])
        assert len(page.query_selector_all("#rotated tbody tr")) == len(cmp_["rotated"])
        page.screenshot(path=str(shots / "dashboard_compare.png"), full_page=True)
    # the static export works from disk, with no server
    site = export_site(path, tmp_path / "site", max_latents=5, write=None)
    page.goto((site / "index.html").as_uri())
    page.wait_for_selector("#feature-table tbody tr")
    page.fill("#search", "script")
    page.wait_for_timeout(400)
    page.goto((site / "feature" / "0" / "3.html").as_uri())
    page.wait_for_selector("#stat-density")
    assert float(page.get_attribute("#stat-density .num", "data-value")) == store.feature("general", 3)["density"]
    _never_ran(page)
    assert watch.problems == []


@pytest.fixture(scope="module")
def tiny(smol_tokenizer, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kinds")
    lm = tiny_model(smol_tokenizer)
    return lm, tmp, store_kinds(tmp, lm, d_sae=8)


def test_every_page_of_server_and_export_has_no_errors(browser, tiny):
    """One SAE, two unrelated SAEs, a fine-tuned pair: every served page and every exported file, no JS error,
    console error or dialog (the export's comparison view of a one-SAE store used to throw)."""
    lm, tmp, kinds = tiny
    page = browser.new_page()
    watch = Watch(page)
    seen = 0
    for kind, (path, saes) in kinds.items():
        store = FeatureStore(path)
        urls = ["/", "/prompt", "/compare"] + [f"/feature/{i}?sae={s['label']}" for s in store.saes
                                                for i in range(s["d_sae"])]
        urls += [f"/compare?a={c['sae_b']}&b={c['sae_a']}" for c in store.summary()["comparisons"]]
        with BackgroundServer(create_app(path, lm=lm, saes=saes)) as url:
            for u in urls:
                page.goto(url + u)
                _rendered(page)
                assert page.query_selector("#error") is None, (kind, u, page.inner_text("#error"))
                seen += 1
            if kind == "one":
                page.goto(url + "/compare")
                page.wait_for_selector("#no-comparison")
        site = export_site(path, tmp / f"site_{kind}", write=None)
        files = sorted(site.rglob("*.html"))
        assert len(files) == 2 + sum(s["d_sae"] for s in store.saes) + len(store.summary()["comparisons"])
        for f in files:
            page.goto(f.as_uri())
            _rendered(page)
            assert page.query_selector("#error") is None, (kind, f, page.inner_text("#error"))
            seen += 1
        if kind == "one":
            page.goto((site / "compare.html").as_uri())
            assert "nothing to compare" in page.inner_text("#no-comparison")
        else:
            page.goto((site / "compare.html").as_uri())
            page.wait_for_selector("#pairs tbody tr")
    assert seen == 21 + 39 + 39 and watch.problems == []   # (3 + 8) + (2 + 8); 2 x ((3 + 16 + 1) + (2 + 16 + 1))


def test_live_test_and_steering_panels(browser, tiny):
    """The feature page's live test shows the latent's activation and quantile on every typed token (equal to
    latent_trace); its steering panel and the prompt page's show the continuations and the loss change that
    steer_latent computes; a latent picked in the prompt page's columns goes into the steering panel."""
    lm, _, kinds = tiny
    path, saes = kinds["pair"]
    store = FeatureStore(path)
    label, sae = "base", saes["base"]
    latent = max(range(sae.d_sae), key=lambda i: store.feature(label, i)["max_act"] or 0)
    text = "Hello there! def add(a, b): return a + b"
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    watch = Watch(page)
    with BackgroundServer(create_app(path, lm=lm, saes=saes)) as url:
        page.goto(f"{url}/feature/{latent}?sae={label}")
        page.wait_for_selector("#live-text")
        page.fill("#live-text", text)
        page.click("#live-go")
        page.wait_for_selector("#live-table tbody tr")
        ids, segs = tokenize_prompt(lm.tokenizer, text)
        want = latent_trace(lm, sae, HOOK, ids, segs, latent, store.quantile_table(label))["tokens"]
        rows = page.query_selector_all("#live-table tbody tr")
        assert len(rows) == len(want)
        for row, w in zip(rows, want):
            act, q = (c.get_attribute("data-value") for c in row.query_selector_all(".num"))
            assert float(act) == pytest.approx(w["activation"], rel=1e-6, abs=1e-7)
            assert (q == "") == (w["quantile"] is None) and (q == "" or float(q) == pytest.approx(w["quantile"]))
        assert any(w["activation"] > 0 for w in want)
        assert len(page.query_selector_all("#live-tokens .tok")) >= 1
        # steering on the feature page (own prompt box)
        page.fill("#steer-prompt", text)
        page.select_option("#steer-mode", "add")
        page.fill("#steer-strength", "5")
        page.fill("#steer-tokens", "6")
        page.click("#steer-go")
        page.wait_for_selector("#steer-loss", timeout=60_000)
        unit = store.feature(label, latent)["max_act"]
        res = steer_latent(lm, sae, HOOK, ids, segs, latent, mode="add", strength=5, unit=unit, max_new_tokens=6)
        assert float(page.get_attribute("#steer-loss .num", "data-value")) == pytest.approx(res["loss"]["delta"])
        shown = page.inner_text("#steer-steered .ctx").replace("\u00b7", " ")
        assert shown.replace("\u21b5", "").strip() == res["steered"]["text"].replace("\n", "").strip()
        assert page.inner_text("#steer-status") == "steering: done"
        # steering from the prompt page: pick a latent in the activation column
        page.goto(f"{url}/prompt?sae={label}")
        page.wait_for_selector("#prompt-text")
        page.fill("#prompt-text", text)
        page.click("#prompt-go")
        page.wait_for_selector("#col-activation .steer-pick")
        picked = int(page.get_attribute("#col-activation .steer-pick", "data-latent"))
        page.click("#col-activation .steer-pick")
        assert page.input_value("#steer-latent") == str(picked)
        page.select_option("#steer-mode", "clamp")
        page.fill("#steer-strength", "0")
        page.fill("#steer-tokens", "3")
        page.click("#steer-go")
        page.wait_for_selector("#steer-loss", timeout=60_000)
        res = steer_latent(lm, sae, HOOK, ids, segs, picked, mode="clamp", strength=0,
                           unit=store.feature(label, picked)["max_act"], max_new_tokens=3)
        assert float(page.get_attribute("#steer-loss .num", "data-value")) == pytest.approx(res["loss"]["delta"])
        assert f"#{picked}" in page.inner_text("#steer-summary")
        page.fill("#steer-latent", "")
        page.click("#steer-go")
        page.wait_for_selector("#steer-out .error")
        assert "'latent' must be an integer" in page.inner_text("#steer-out .error")
    assert [p for p in watch.problems if "status of 400" not in p] == []   # the refused request's own 400


@pytest.fixture(scope="module")
def smol_store(smol_lm, tmp_path_factory):
    """A random sparse SAE (d_sae 128) on the real model at its default hook, stored over real held-out tokens."""
    from domain_sae.models.hooks import capture, resolve_hook
    ids = torch.tensor([smol_lm.tokenizer("The quick brown fox jumps over the lazy dog. def f(x): return x")
                        ["input_ids"]])
    a = capture(smol_lm.model, resolve_hook(smol_lm.model, HOOK), ids)
    sae = make_sae(5, d_in=a.shape[-1], d_sae=128, enc_std=1.0 / float(a.std() * a.shape[-1] ** 0.5), bias=-2.0,
                   metadata={"model_name": "smollm2-135m-instruct", "context_size": 64})
    tmp = tmp_path_factory.mktemp("smol")
    path = build_feature_store(SAESet.of([sae], [tmp / "random_sae"]), HeldoutData.live(["chat", "code"]),
                               tmp / "smol.sqlite", n_tokens=256, lm=smol_lm, write=None)
    return path, sae


@pytest.mark.slow   # about a minute: the real model, a store over its held-out tokens, a prompt's full ablation
def test_offline_default_model_prompt(browser, smol_lm, smol_store, tmp_path):
    path, sae = smol_store
    app = create_app(path, lm=smol_lm, saes={"random_sae": sae})
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    watch = Watch(page)
    store = FeatureStore(path)
    latent = max(range(sae.d_sae), key=lambda i: store.feature(None, i)["max_act"] or 0)
    text = "The quick brown fox jumps over the lazy dog. def f(x): return x"
    ids, segs = tokenize_prompt(smol_lm.tokenizer, text)
    with BackgroundServer(app) as url:
        # the feature page's live test and steering on the real model
        page.goto(f"{url}/feature/{latent}")
        page.wait_for_selector("#live-text")
        page.fill("#live-text", text)
        page.click("#live-go")
        page.wait_for_selector("#live-table tbody tr")
        want = latent_trace(smol_lm, sae, HOOK, ids, segs, latent, store.quantile_table(None))["tokens"]
        acts = [float(r.query_selector(".num").get_attribute("data-value"))
                for r in page.query_selector_all("#live-table tbody tr")]
        assert acts == pytest.approx([w["activation"] for w in want], rel=1e-5, abs=1e-6)
        assert any(a > 0 for a in acts)
        page.fill("#steer-prompt", text)
        page.fill("#steer-strength", "8")
        page.fill("#steer-tokens", "8")
        page.click("#steer-go")
        page.wait_for_selector("#steer-loss", timeout=300_000)
        res = steer_latent(smol_lm, sae, HOOK, ids, segs, latent, mode="add", strength=8,
                           unit=store.feature(None, latent)["max_act"], max_new_tokens=8)
        assert float(page.get_attribute("#steer-loss .num", "data-value")) == pytest.approx(res["loss"]["delta"],
                                                                                            rel=1e-4, abs=1e-5)
        assert page.inner_text("#steer-clean .ctx") and page.inner_text("#steer-steered .ctx")
        page.screenshot(path=str(_shots(tmp_path) / "dashboard_feature_panels_smollm2.png"), full_page=True)
        page.goto(url + "/feature/0")
        page.wait_for_selector("#stat-density")
        assert float(page.get_attribute("#stat-density .num", "data-value")) == FeatureStore(path).feature(None, 0)[
            "density"]
        page.goto(url + "/prompt")
        page.wait_for_selector("#prompt-text")
        page.select_option("#prompt-kind", "chat")
        page.fill("#prompt-text", "user: Add two numbers in Python?\nassistant: def add(a, b):")
        page.click("#prompt-go")
        page.wait_for_selector("#col-activation")
        page.wait_for_function("() => document.querySelector('#ablation-status').textContent.includes('done')",
                               timeout=600_000)
        assert "<|im_start|>" in page.inner_text("#prompt-tokens")
        for col in ("#col-activation", "#col-quantile", "#col-logit", "#col-ablation"):
            assert page.query_selector(col) is not None
        page.click("#col-activation .steer-pick")
        page.fill("#steer-tokens", "6")
        page.click("#steer-go")
        page.wait_for_selector("#steer-loss", timeout=300_000)
        page.screenshot(path=str(_shots(tmp_path) / "dashboard_prompt_smollm2.png"), full_page=True)
    assert watch.problems == []
