"""SAE-vs-SAE rows of the store: one-to-one matching by decoder cosine and rotation against a parent SAE.

For every pair of SAEs on the same hook (same d_in): the Hungarian matching of ``analysis.overlap.hungarian_match``
(maximum total decoder cosine, one-to-one; skipped above ``max_hungarian_latents``, the solver being O(n^3)),
``matched_fraction`` = share of pairs with cosine >= ``match_threshold``. When one SAE was fine-tuned from the other
(its metadata ``lineage.parent`` names the other's path) and both have the same d_sae, ``rotation`` holds the
same-index decoder cosine cos(W_dec_child[i], W_dec_parent[i]) of every latent: how far it rotated during
fine-tuning.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..analysis.overlap import hungarian_match, matched_fraction
from .options import FeatureOptions


def _same_path(a: Any, b: Any) -> bool:
    if not a or not b:
        return False
    try:
        pa, pb = Path(str(a)).resolve(), Path(str(b)).resolve()
    except OSError:
        return False
    return pa == pb or pa / "sae" == pb or pa == pb / "sae"


def parent_relation(meta_a: dict, meta_b: dict, path_a: str, path_b: str) -> int:
    """1 when A is B's parent, -1 when B is A's parent, 0 otherwise (by the metadata lineage)."""
    par_b = (meta_b.get("lineage") or {}).get("parent")
    par_a = (meta_a.get("lineage") or {}).get("parent")
    if _same_path(par_b, path_a) or _same_path(par_b, meta_a.get("source_path")):
        return 1
    if _same_path(par_a, path_b) or _same_path(par_a, meta_b.get("source_path")):
        return -1
    return 0


def same_index_cosine(W_a: torch.Tensor, W_b: torch.Tensor) -> torch.Tensor:
    a = W_a.detach().to(torch.float32).cpu()
    b = W_b.detach().to(torch.float32).cpu()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


def write_comparisons(conn: sqlite3.Connection, saes: Sequence[Any], paths: Sequence[str], hooks: Sequence[str],
                      metas: Sequence[dict], opts: FeatureOptions, note: Callable[[str], None]) -> None:
    for a in range(len(saes)):
        for b in range(a + 1, len(saes)):
            if hooks[a] != hooks[b] or saes[a].d_in != saes[b].d_in:
                continue
            rel = parent_relation(metas[a], metas[b], paths[a], paths[b])
            frac = mean = None
            note_text = ""
            if max(saes[a].d_sae, saes[b].d_sae) <= opts.max_hungarian_latents:
                note(f"matching SAE {a} and SAE {b} (Hungarian, {saes[a].d_sae} x {saes[b].d_sae})")
                m = hungarian_match(saes[a].W_dec, saes[b].W_dec)
                conn.executemany("INSERT INTO pairs VALUES (?, ?, ?, ?, ?)",
                                 [(a, b, int(r), int(c), float(v)) for r, c, v in
                                  zip(m.rows.tolist(), m.cols.tolist(), m.cosines.tolist())])
                frac = matched_fraction(m.cosines, opts.match_threshold)
                mean = float(m.cosines.mean())
            else:
                note_text = (f"Hungarian matching skipped: more than {opts.max_hungarian_latents} latents "
                             f"(the exact solver is O(n^3)).")
            if saes[a].d_sae == saes[b].d_sae and rel != 0:
                child, parent = (b, a) if rel == 1 else (a, b)
                cos = same_index_cosine(saes[child].W_dec, saes[parent].W_dec)
                conn.executemany("INSERT INTO rotation VALUES (?, ?, ?, ?)",
                                 [(a, b, i, float(v)) for i, v in enumerate(cos.tolist())])
            conn.execute("INSERT INTO comparisons VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (a, b, opts.match_threshold, frac, mean, rel, note_text))
