"""Browser tests: Playwright drives the system Chromium through list -> feature -> prompt -> comparison, checks
that the numbers shown equal the stored ones, that all four prompt metric columns fill in, that a `<script>`
planted in a dataset (and typed into a prompt) never runs, and saves screenshots. One test runs the offline
default model (SmolLM2-135M-Instruct) end to end."""

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

from feature_helpers import HOOK, PLANTED, finetuned_copy, heldout_sets, make_sae  # noqa: E402 (after the Chromium check)

from domain_sae.dashboard.app import create_app  # noqa: E402 (after the Chromium check)
from domain_sae.dashboard.export import export_site  # noqa: E402 (after the Chromium check)
from domain_sae.dashboard.serve import BackgroundServer  # noqa: E402 (after the Chromium check)
from domain_sae.features.build import build_feature_store  # noqa: E402 (after the Chromium check)
from domain_sae.features.options import FeatureOptions  # noqa: E402 (after the Chromium check)
from domain_sae.features.queries import FeatureStore  # noqa: E402 (after the Chromium check)


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


def _never_ran(page) -> None:
    assert page.evaluate("() => window.__pwned === undefined"), "a planted script ran"
    assert page.query_selector_all("main img") == []


def test_navigation_numbers_prompt_and_planted_script(browser, smol_tokenizer, tmp_path):
    from conftest import make_tiny_model

    from domain_sae.models.load import LoadedModel
    lm = LoadedModel(make_tiny_model("llama"), smol_tokenizer, "tiny-llama", "in-process", "llama")
    parent = make_sae(1)
    child = finetuned_copy(parent, 2, str(tmp_path / "general"))
    path = build_feature_store([tmp_path / "general", tmp_path / "general_chat"], ["chat", "code"], 192,
                               tmp_path / "f.sqlite", lm=lm, saes=[parent, child],
                               heldout=heldout_sets(smol_tokenizer),
                               options=FeatureOptions(top_k=6, top_k_per_dataset=4, window_before=8,
                                                      window_after=4), write=None)
    store = FeatureStore(path)
    shots = _shots(tmp_path)
    app = create_app(path, lm=lm, saes={"general": parent, "general_chat": child}, ablation_batch=8)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
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
    assert errors == []


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
    path = build_feature_store([tmp / "random_sae"], ["chat", "code"], 256, tmp / "smol.sqlite", lm=smol_lm,
                               saes=[sae], write=None)
    return path, sae


def test_offline_default_model_prompt(browser, smol_lm, smol_store, tmp_path):
    path, sae = smol_store
    app = create_app(path, lm=smol_lm, saes={"random_sae": sae})
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    with BackgroundServer(app) as url:
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
        page.screenshot(path=str(_shots(tmp_path) / "dashboard_prompt_smollm2.png"), full_page=True)
