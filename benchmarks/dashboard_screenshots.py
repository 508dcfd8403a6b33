"""Screenshots of the four dashboard pages for the README (Playwright + the system Chromium).

    python benchmarks/dashboard_screenshots.py STORE [--out docs/img] [--prompt TEXT]

Serves STORE (model and SAEs loaded from the store's provenance), opens the feature list, the most
domain-specific latent's page, the prompt page with a chat exchange (waiting for the ablation column) and the
comparison page, and writes dashboard_{list,feature,prompt,compare}.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from domain_sae.dashboard.app import create_app  # noqa: E402
from domain_sae.dashboard.serve import BackgroundServer  # noqa: E402
from domain_sae.features.queries import FeatureStore  # noqa: E402

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
CHAT = "user: How do I reverse a list in Python?\nassistant: Use items[::-1]."


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store")
    p.add_argument("--out", default=str(ROOT / "docs" / "img"))
    p.add_argument("--prompt", default=CHAT)
    a = p.parse_args(argv)
    from playwright.sync_api import sync_playwright
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    st = FeatureStore(a.store)
    latent = st.list_features(None, sort="specificity", per_page=1)["rows"][0]["latent"]
    with BackgroundServer(create_app(a.store)) as url, sync_playwright() as pw:
        b = pw.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        page = b.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url + "/")
        page.wait_for_selector("#feature-table tbody tr")
        page.screenshot(path=str(out / "dashboard_list.png"))
        page.goto(f"{url}/feature/{latent}")
        page.wait_for_selector("#top-examples")
        page.set_viewport_size({"width": 1280, "height": 1500})
        page.screenshot(path=str(out / "dashboard_feature.png"))
        page.set_viewport_size({"width": 1280, "height": 900})
        page.goto(url + "/prompt")
        page.select_option("#prompt-kind", "chat")
        page.fill("#prompt-text", a.prompt)
        page.click("#prompt-go")
        page.wait_for_function("() => document.querySelector('#ablation-status') && "
                               "document.querySelector('#ablation-status').textContent.includes('done')",
                               timeout=1_200_000)
        page.screenshot(path=str(out / "dashboard_prompt.png"), full_page=True)
        page.goto(url + "/compare")
        page.wait_for_selector("#pairs")
        page.screenshot(path=str(out / "dashboard_compare.png"))
        b.close()
    print(f"wrote dashboard_*.png to {out}")


if __name__ == "__main__":
    main()
