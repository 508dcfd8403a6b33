"""Read-only queries over a finished feature store (what the dashboard and the static export show).

Every method returns JSON-ready dicts; unknown SAEs or latents raise :class:`NotFound` (the server answers 404).
Feature lists are paged in SQL (``LIMIT``/``OFFSET`` over indexed columns), so 32k+ latents are never loaded whole.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Self

import numpy as np

from .schema import StoreError, open_store, read_meta

SORTS = {"density": "density", "max_act": "max_act", "specificity": "specificity", "latent": "latent",
         "mean_act": "mean_act"}


class NotFound(StoreError):
    """An SAE, latent or comparison that the store does not hold."""


def _escape_like(q: str) -> str:
    return q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class FeatureStore:
    """A store opened read-only: ``FeatureStore(path)``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.conn = open_store(self.path)
        self.meta = read_meta(self.conn)
        cols = ("sae_id", "label", "path", "sha256", "hook", "d_in", "d_sae", "metadata")
        self.saes = [dict(zip(cols, r)) for r in self.conn.execute(f"SELECT {', '.join(cols)} FROM saes "
                                                                   "ORDER BY sae_id")]
        for s in self.saes:
            s["metadata"] = json.loads(s["metadata"] or "{}")
        self.datasets = [dict(zip(("ds_id", "spec", "n_tokens", "n_kept"), r))
                         for r in self.conn.execute(
                             "SELECT ds_id, spec, n_tokens, n_kept FROM datasets ORDER BY ds_id")]
        self.window = self.meta.get("window", [10, 4])
        self._sequence = lru_cache(maxsize=512)(self._load_sequence)

    # -- lookup -----------------------------------------------------------------------------------------------
    def sae(self, ref: Any = None) -> dict:
        """The SAE by id or label (default: the first)."""
        if ref is None or ref == "":
            return self.saes[0]
        for s in self.saes:
            if str(s["sae_id"]) == str(ref) or s["label"] == str(ref):
                return s
        raise NotFound(f"This store has no SAE {ref!r}; it holds {', '.join(s['label'] for s in self.saes)}.")

    def _check_latent(self, sae: dict, latent: int) -> None:
        if not 0 <= int(latent) < sae["d_sae"]:
            raise NotFound(f"SAE {sae['label']} has latents 0..{sae['d_sae'] - 1}; there is no latent {latent}.")

    def summary(self) -> dict:
        public = [{k: v for k, v in s.items() if k != "metadata"} for s in self.saes]
        comps = [dict(zip(("sae_a", "sae_b", "threshold", "matched_fraction", "mean_cosine", "b_parent_is_a", "note"),
                          r)) for r in self.conn.execute("SELECT * FROM comparisons")]
        return {"saes": public, "datasets": self.datasets, "provenance": self.meta.get("provenance"),
                "schema_version": self.meta.get("schema_version"), "comparisons": comps}

    # -- feature list -----------------------------------------------------------------------------------------
    def list_features(self, sae: Any = None, *, q: str = "", sort: str = "density", order: str = "desc",
                      page: int = 0, per_page: int = 50) -> dict:
        """One page of latents: ``q`` matches the text of the top contexts (case-insensitive, literal) or, when
        it is ``#N``, latent N; sorted by ``sort`` (density, max_act, specificity, mean_act, latent)."""
        s = self.sae(sae)
        if sort not in SORTS:
            raise StoreError(f"sort must be one of {', '.join(SORTS)} (got {sort!r}).")
        direction = "ASC" if order == "asc" else "DESC"
        per_page = max(1, min(int(per_page), 500))
        page = max(0, int(page))
        where, args = "sae_id = ?", [s["sae_id"]]
        q = (q or "").strip()
        if q.startswith("#") and q[1:].isdigit():
            where += " AND latent = ?"
            args.append(int(q[1:]))
        elif q:
            where += " AND search_text LIKE ? ESCAPE '\\'"
            args.append(f"%{_escape_like(q)}%")
        total = self.conn.execute(f"SELECT COUNT(*) FROM latents WHERE {where}", args).fetchone()[0]
        rows = self.conn.execute(
            f"SELECT latent, density, mean_act, max_act, specificity, spec_dataset, search_text FROM latents "
            f"WHERE {where} ORDER BY {SORTS[sort]} IS NULL, {SORTS[sort]} {direction}, latent ASC LIMIT ? OFFSET ?",
            args + [per_page, page * per_page]).fetchall()
        out = [{"latent": r[0], "density": r[1], "mean_act": r[2], "max_act": r[3], "specificity": r[4],
                "spec_dataset": r[5], "snippet": (r[6] or "").split(" \u2016 ")[0][:120]} for r in rows]
        return {"sae": s["label"], "sae_id": s["sae_id"], "total": total, "page": page, "per_page": per_page,
                "sort": sort, "order": order.lower() if order in ("asc", "desc") else "desc", "q": q, "rows": out}

    # -- one latent -------------------------------------------------------------------------------------------
    def _load_sequence(self, ds: int, seq: int) -> tuple[list[int], list[int], list[str]]:
        r = self.conn.execute("SELECT ids, segments, texts FROM sequences WHERE ds_id = ? AND seq = ?",
                              (ds, seq)).fetchone()
        return (np.frombuffer(r[0], dtype=np.int32).tolist(), np.frombuffer(r[1], dtype=np.int8).tolist(),
                json.loads(r[2]))

    def _example(self, row) -> dict:
        scope, kind, rank, interval, ds, seq, pos, value, lo, acts = row
        acts = np.frombuffer(acts, dtype=np.float32).tolist()
        ids, segs, texts = self._sequence(ds, seq)
        hi = lo + len(acts)
        return {"scope": scope, "kind": kind, "rank": rank, "interval": interval, "ds": ds, "seq": seq, "pos": pos,
                "value": value, "lo": lo, "highlight": pos - lo, "ids": ids[lo:hi], "texts": texts[lo:hi],
                "segments": segs[lo:hi], "acts": [round(a, 6) for a in acts]}

    def feature(self, sae: Any, latent: int) -> dict:
        s = self.sae(sae)
        latent = int(latent)
        self._check_latent(s, latent)
        r = self.conn.execute("SELECT density, mean_act, max_act, n_active, hist, specificity, spec_dataset, "
                              "logits_pos, logits_neg, neighbours, intervals FROM latents WHERE sae_id = ? AND "
                              "latent = ?", (s["sae_id"], latent)).fetchone()
        if r is None:
            raise NotFound(f"Latent {latent} of {s['label']} is not in the store.")
        per_ds = [dict(zip(("ds_id", "density", "mean_act", "max_act", "n_active", "auroc"), x)) for x in
                  self.conn.execute("SELECT ds_id, density, mean_act, max_act, n_active, auroc FROM latent_datasets "
                                    "WHERE sae_id = ? AND latent = ? ORDER BY ds_id", (s["sae_id"], latent))]
        for d in per_ds:
            d["spec"] = self.datasets[d["ds_id"]]["spec"]
        exs = [self._example(x) for x in self.conn.execute(
            "SELECT scope, kind, rank, interval, ds_id, seq, pos, value, lo, acts FROM examples WHERE sae_id = ? AND "
            "latent = ? ORDER BY kind, scope, interval, rank", (s["sae_id"], latent))]
        intervals = json.loads(r[10])
        quant = [{"interval": q, "lo": intervals[q], "hi": intervals[q + 1],
                  "examples": [e for e in exs if e["kind"] == "quantile" and e["interval"] == q]}
                 for q in range(max(0, len(intervals) - 1))]
        return {
            "sae": s["label"], "sae_id": s["sae_id"], "hook": s["hook"], "latent": latent, "d_sae": s["d_sae"],
            "density": r[0], "mean_act": r[1], "max_act": r[2], "n_active": r[3],
            "histogram": {"log10_edges": self.meta["hist_edges"], "counts": np.frombuffer(r[4], np.int64).tolist()},
            "specificity": r[5], "spec_dataset": r[6], "per_dataset": per_ds,
            "logits": {"label": "direct path", "positive": json.loads(r[7]), "negative": json.loads(r[8])},
            "neighbours": json.loads(r[9]),
            "top": [e for e in exs if e["kind"] == "top" and e["scope"] == -1],
            "top_by_dataset": [{"ds_id": d["ds_id"], "spec": d["spec"],
                                "examples": [e for e in exs if e["kind"] == "top" and e["scope"] == d["ds_id"]]}
                               for d in self.datasets],
            "quantiles": quant, "other_saes": self._links(s, latent),
        }

    def _links(self, s: dict, latent: int) -> list[dict]:
        """The same index in the other SAEs on the same hook, and the Hungarian partner where matched."""
        out = []
        for o in self.saes:
            if o["sae_id"] == s["sae_id"] or o["hook"] != s["hook"]:
                continue
            link = {"sae": o["label"], "sae_id": o["sae_id"], "same_index": latent if latent < o["d_sae"] else None}
            a, b = sorted((s["sae_id"], o["sae_id"]))
            col_self, col_other = ("latent_a", "latent_b") if s["sae_id"] == a else ("latent_b", "latent_a")
            m = self.conn.execute(f"SELECT {col_other}, cosine FROM pairs WHERE sae_a = ? AND sae_b = ? AND "
                                  f"{col_self} = ?", (a, b, latent)).fetchone()
            link["matched"] = None if m is None else {"latent": m[0], "cosine": m[1]}
            out.append(link)
        return out

    def quantile_table(self, sae: Any) -> np.ndarray:
        """``[d_sae, 101]`` percentiles of each latent's active values (NaN rows for latents that never fired)."""
        s = self.sae(sae)
        table = np.full((s["d_sae"], 101), np.nan, dtype=np.float32)
        for latent, blob in self.conn.execute("SELECT latent, quantiles FROM latents WHERE sae_id = ?", (s["sae_id"],)):
            if blob:
                table[latent] = np.frombuffer(blob, dtype=np.float32)
        return table

    # -- comparison -------------------------------------------------------------------------------------------
    def compare(self, a: Any = None, b: Any = None, *, page: int = 0, per_page: int = 50, n_lists: int = 50) -> dict:
        """Matched pairs (highest cosine first, paged), unmatched latents of each side (partner cosine below the
        threshold, or no partner) and the most-rotated latents (lowest same-index cosine to the parent)."""
        comps = self.conn.execute("SELECT sae_a, sae_b, threshold, matched_fraction, mean_cosine, b_parent_is_a, "
                                  "note FROM comparisons ORDER BY sae_a, sae_b").fetchall()
        if not comps:
            raise NotFound("This store holds no pair of SAEs on the same hook, so there is nothing to compare.")
        if a is None and b is None:
            ia, ib = comps[0][0], comps[0][1]
        else:
            ia, ib = self.sae(a)["sae_id"], self.sae(b)["sae_id"]
        flip = ia > ib
        lo_id, hi_id = sorted((ia, ib))
        c = next((x for x in comps if x[0] == lo_id and x[1] == hi_id), None)
        if c is None:
            raise NotFound(f"SAEs {ia} and {ib} are not on the same hook (or are the same SAE); nothing to compare.")
        per_page = max(1, min(int(per_page), 500))
        ca, cb = ("latent_b", "latent_a") if flip else ("latent_a", "latent_b")
        thr = c[2]
        n_pairs = self.conn.execute("SELECT COUNT(*) FROM pairs WHERE sae_a = ? AND sae_b = ?",
                                    (lo_id, hi_id)).fetchone()[0]
        pairs = [{"a": r[0], "b": r[1], "cosine": r[2]} for r in self.conn.execute(
            f"SELECT {ca}, {cb}, cosine FROM pairs WHERE sae_a = ? AND sae_b = ? ORDER BY cosine DESC, {ca} "
            f"LIMIT ? OFFSET ?", (lo_id, hi_id, per_page, max(0, int(page)) * per_page))]
        sa, sb = self.saes[ia], self.saes[ib]

        def unmatched(col: str, side: dict) -> list[dict]:
            paired = {r[0]: r[1] for r in self.conn.execute(f"SELECT {col}, cosine FROM pairs WHERE sae_a = ? AND "
                                                             f"sae_b = ?", (lo_id, hi_id))}
            rows = [(i, paired.get(i)) for i in range(side["d_sae"]) if paired.get(i) is None or paired[i] < thr]
            rows.sort(key=lambda t: (-1.0 if t[1] is None else t[1]))
            return [{"latent": i, "best_pair_cosine": v} for i, v in rows[:n_lists]] if n_pairs else []

        rot = [{"latent": r[0], "cosine": r[1]} for r in self.conn.execute(
            "SELECT latent, cosine FROM rotation WHERE sae_a = ? AND sae_b = ? ORDER BY cosine ASC LIMIT ?",
            (lo_id, hi_id, n_lists))]
        rel = c[5] if not flip else -c[5]
        return {"a": sa["label"], "a_id": ia, "b": sb["label"], "b_id": ib, "hook": sa["hook"], "threshold": thr,
                "matched_fraction": c[3], "mean_cosine": c[4], "note": c[6], "n_pairs": n_pairs, "page": int(page),
                "per_page": per_page, "pairs": [self._pair_row(p, ia, ib) for p in pairs],
                "unmatched_a": unmatched(ca, sa), "unmatched_b": unmatched(cb, sb),
                "parent": {1: sa["label"], -1: sb["label"]}.get(rel), "rotated": rot,
                "comparisons": [{"a": self.saes[x[0]]["label"], "b": self.saes[x[1]]["label"]} for x in comps]}

    def _pair_row(self, p: dict, ia: int, ib: int) -> dict:
        def snip(sid: int, latent: int) -> dict:
            r = self.conn.execute("SELECT density, max_act, search_text FROM latents WHERE sae_id = ? AND latent = ?",
                                  (sid, latent)).fetchone()
            return {"density": r[0], "max_act": r[1], "snippet": (r[2] or "").split(" \u2016 ")[0][:80]}
        return {**p, "a_info": snip(ia, p["a"]), "b_info": snip(ib, p["b"])}

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
