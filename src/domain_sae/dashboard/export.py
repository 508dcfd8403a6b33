"""Static export: the feature list, every feature page and the comparison pages as plain files (no server).

    DIR/index.html                     feature list (all rows embedded; search, sort and paging in the browser;
                                       the search covers the first 300 characters of the top contexts)
    DIR/feature/<sae_id>/<latent>.html one page per latent (its data embedded as JSON)
    DIR/compare.html, DIR/compare/<a>-<b>.html   comparisons (first ``pairs`` matched pairs)
    DIR/assets/app.js, style.css       the vendored front end

Pages embed their data in a non-executed JSON block (see :mod:`.pages`), so opening them from disk works offline.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..features.queries import FeatureStore
from .pages import ASSETS, _clean, asset_bytes, render_page


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def export_site(store_path: str | Path, out_dir: str | Path, *, max_latents: int | None = None, pairs: int = 200,
                write: Callable[[str], None] | None = print) -> Path:
    """Write the static site for the store into ``out_dir``; ``max_latents`` limits the feature pages per SAE
    (the first N by index; default all). Returns ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with FeatureStore(store_path) as store:
        for name in ASSETS:
            (out / "assets").mkdir(exist_ok=True)
            (out / "assets" / name).write_bytes(asset_bytes(name))
        summary = store.summary()
        rows = {}
        for s in store.saes:
            rs = store.conn.execute("SELECT latent, density, mean_act, max_act, specificity, spec_dataset, "
                                    "search_text FROM latents WHERE sae_id = ? ORDER BY latent", (s["sae_id"],))
            rows[str(s["sae_id"])] = [{"latent": r[0], "density": r[1], "mean_act": r[2], "max_act": r[3],
                                       "specificity": r[4], "spec_dataset": r[5],
                                       "snippet": (r[6] or "").split(" \u2016 ")[0][:120], "search": (r[6] or "")[:300]}
                                      for r in rs]
        _write(out / "index.html", render_page("list", root="", mode="export", data={"store": summary, "rows": rows}))
        n = 0
        for s in store.saes:
            limit = s["d_sae"] if max_latents is None else min(s["d_sae"], max_latents)
            for i in range(limit):
                f = store.feature(s["label"], i)
                _write(out / "feature" / str(s["sae_id"]) / f"{i}.html",
                       render_page("feature", root="../../", mode="export", data={"feature": f},
                                   title=f"{s['label']} #{i}"))
                n += 1
                if write and n % 1000 == 0:
                    write(f"[export] {n} feature pages")
        comps = summary["comparisons"]
        for k, c in enumerate(comps):
            data = {"compare": _clean(store.compare(c["sae_a"], c["sae_b"], per_page=pairs))}
            _write(out / "compare" / f"{c['sae_a']}-{c['sae_b']}.html",
                   render_page("compare", root="../", mode="export", data=data))
            if k == 0:
                _write(out / "compare.html", render_page("compare", root="", mode="export", data=data))
        if not comps:
            _write(out / "compare.html", render_page("compare", root="", mode="export", data={"compare": None}))
    if write:
        write(f"[export] wrote {n} feature pages and {len(comps)} comparison(s) to {out}")
    return out
