"""The feature store's SQLite schema (versioned) and opening a store safely.

A store is one SQLite file. ``meta`` holds JSON values: ``schema_version``, ``complete`` (written last, in the
same transaction that ends the build; the file is built under a temporary name and renamed only afterwards),
``provenance`` (SAE paths and hashes, model, hooks, datasets, token counts, tool version, options) and the
histogram bin edges. Tables:

- ``saes``: one row per SAE (``sae_id``, ``label``, ``path``, ``sha256`` of its weights file, ``hook``, ``d_in``,
  ``d_sae``, ``metadata`` JSON).
- ``datasets``: one row per dataset (``ds_id``, ``spec``, ``n_tokens``, ``n_kept``: positions that count in the
  statistics, i.e. not special tokens when those are excluded).
- ``sequences``: the held-out token sequences (``ids`` int32 blob, ``segments`` int8 blob, ``texts`` JSON list of
  per-token display strings, multi-byte characters merged onto the token that completes them).
- ``latents``: per latent: ``density`` = n_active / n_kept, ``mean_act`` = mean of f over active positions,
  ``max_act``, ``n_active``, ``hist`` (int64 blob: counts of log10 f over the bins in meta ``hist_edges``),
  ``quantiles`` (float32 blob: 101 percentiles of the active values), ``specificity`` (max over datasets of the
  one-vs-rest AUROC) and ``spec_dataset``, ``logits_pos``/``logits_neg`` (JSON ``[[token_id, text, value]]``),
  ``neighbours`` (JSON ``[[latent, cosine]]``), ``intervals`` (JSON quantile-interval bounds), ``search_text``.
- ``latent_datasets``: the same statistics per dataset, plus ``auroc`` (that dataset vs all others).
- ``examples``: contexts: ``scope`` (-1 = all datasets, else the ds_id whose top examples these are), ``kind``
  (``top`` or ``quantile``), ``rank``, ``interval``, position (``ds_id``, ``seq``, ``pos``), ``value``, window start
  ``lo`` and ``acts`` (float32 blob: the latent's activation at every token of the window).
- ``comparisons`` / ``pairs`` / ``rotation``: SAE-vs-SAE matching (Hungarian on decoder cosine) and same-index
  decoder cosine to a parent SAE.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from ..errors import UserError

SCHEMA_VERSION = 1
FORMAT = "domain-sae-features"

SCHEMA_SQL = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE saes (sae_id INTEGER PRIMARY KEY, label TEXT UNIQUE NOT NULL, path TEXT, sha256 TEXT, hook TEXT,
                   d_in INTEGER, d_sae INTEGER, metadata TEXT);
CREATE TABLE datasets (ds_id INTEGER PRIMARY KEY, spec TEXT NOT NULL, n_tokens INTEGER, n_kept INTEGER);
CREATE TABLE sequences (ds_id INTEGER, seq INTEGER, ids BLOB, segments BLOB, texts TEXT,
                        PRIMARY KEY (ds_id, seq));
CREATE TABLE latents (sae_id INTEGER, latent INTEGER, density REAL, mean_act REAL, max_act REAL,
                      n_active INTEGER, hist BLOB, quantiles BLOB, specificity REAL, spec_dataset INTEGER,
                      logits_pos TEXT, logits_neg TEXT, neighbours TEXT, intervals TEXT, search_text TEXT,
                      PRIMARY KEY (sae_id, latent));
CREATE INDEX latents_density ON latents (sae_id, density);
CREATE INDEX latents_max ON latents (sae_id, max_act);
CREATE INDEX latents_spec ON latents (sae_id, specificity);
CREATE TABLE latent_datasets (sae_id INTEGER, latent INTEGER, ds_id INTEGER, density REAL, mean_act REAL,
                              max_act REAL, n_active INTEGER, auroc REAL, PRIMARY KEY (sae_id, latent, ds_id));
CREATE TABLE examples (sae_id INTEGER, latent INTEGER, scope INTEGER, kind TEXT, rank INTEGER,
                       interval INTEGER, ds_id INTEGER, seq INTEGER, pos INTEGER, value REAL, lo INTEGER,
                       acts BLOB);
CREATE INDEX examples_latent ON examples (sae_id, latent);
CREATE TABLE comparisons (sae_a INTEGER, sae_b INTEGER, threshold REAL, matched_fraction REAL,
                          mean_cosine REAL, b_parent_is_a INTEGER, note TEXT, PRIMARY KEY (sae_a, sae_b));
CREATE TABLE pairs (sae_a INTEGER, sae_b INTEGER, latent_a INTEGER, latent_b INTEGER, cosine REAL);
CREATE INDEX pairs_ab ON pairs (sae_a, sae_b, cosine);
CREATE TABLE rotation (sae_a INTEGER, sae_b INTEGER, latent INTEGER, cosine REAL);
CREATE INDEX rotation_ab ON rotation (sae_a, sae_b, cosine);
"""


class StoreError(UserError):
    """A feature store that cannot be used (missing, unfinished, another schema version, not a store)."""


def create_schema(conn: sqlite3.Connection) -> None:
    conn.executescript(SCHEMA_SQL)
    put_meta(conn, "format", FORMAT)
    put_meta(conn, "schema_version", SCHEMA_VERSION)
    put_meta(conn, "complete", False)


def put_meta(conn: sqlite3.Connection, key: str, value: Any) -> None:
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))


def read_meta(conn: sqlite3.Connection) -> dict[str, Any]:
    return {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM meta")}


def open_store(path: str | Path) -> sqlite3.Connection:
    """Open a finished store read-only (``check_same_thread=False``: the server reads it from worker threads).
    :class:`StoreError` when the file is missing, not a store, unfinished or of another schema version."""
    p = Path(path)
    if not p.is_file():
        raise StoreError(f"Feature store {p} does not exist; build one with `dsae features SAE_DIR --out {p}`.")
    try:
        conn = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
        meta = read_meta(conn)
    except (sqlite3.DatabaseError, json.JSONDecodeError) as e:
        raise StoreError(f"{p} is not a feature store ({e}); build one with `dsae features`.") from None
    if meta.get("format") != FORMAT:
        conn.close()
        raise StoreError(f"{p} is an SQLite file but not a domain-sae feature store.")
    if meta.get("schema_version") != SCHEMA_VERSION:
        conn.close()
        raise StoreError(f"{p} has schema version {meta.get('schema_version')}, this tool reads version "
                         f"{SCHEMA_VERSION}; rebuild it with this version's `dsae features`.")
    if meta.get("complete") is not True:
        conn.close()
        raise StoreError(f"{p} is an unfinished feature store (its build was interrupted); build it again.")
    return conn
