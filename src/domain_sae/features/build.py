"""Build a feature store: one streaming pass per dataset over held-out tokens, then per-latent finalisation.

    build_feature_store(saes: SAESet, data: HeldoutData, out, n_tokens=N)   (`dsae features`; the study calls it too)

Per dataset, the held-out sample (:class:`~domain_sae.evaluation.heldout_data.HeldoutData`: the one ``dsae eval``
draws, with the held-out options resolved from the SAEs' metadata by the same rule, or a held-out activation cache)
is run through the model in batches of ``batch_size`` sequences, stopping at each hook (``models.hooks.capture``);
every SAE at that hook encodes the kept positions in chunks and a :class:`~.accumulate.LatentAccumulator` per
(SAE, dataset) takes the statistics (from a cache: its activations, no model pass). Hook activations are spilled to
a float32 memory map in the build's temporary folder so that the context windows' activations can be computed at
the end without a second model pass. Memory is bounded (accumulators + one chunk) and predicted before anything
runs. The store is written under a temporary name and renamed when complete: a killed build leaves no file at
``out`` (only a ``.tmp-`` folder beside it, removed by the next build).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..config import EvalConfig
from ..data.segments import training_mask
from ..errors import UserError
from ..evaluation.heldout_data import HeldoutData
from ..evaluation.sae_set import SAESet
from ..util.atomic import move_into_place, remove_leftovers
from .accumulate import LatentAccumulator, hist_edges
from .compare import write_comparisons
from .detok import token_texts
from .finalize import finalize_sae
from .options import FeatureOptions
from .schema import FORMAT, create_schema, put_meta

__all__ = ["FeatureOptions", "build_feature_store", "predict_memory"]


class Progress:
    """Progress lines with rate and ETA, at most one per ``every`` seconds (``write`` receives each line)."""

    def __init__(self, total: int, write: Callable[[str], None] | None, every: float = 2.0):
        self.total, self.write, self.every = max(1, total), write, every
        self.done, self.t0, self.last = 0, time.perf_counter(), 0.0

    def advance(self, n: int, label: str) -> None:
        self.done += n
        now = time.perf_counter()
        if self.write and (now - self.last >= self.every or self.done >= self.total):
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            self.write(f"[features] {self.done:,}/{self.total:,} tokens of all datasets "
                       f"({100 * self.done / self.total:.0f}%; now {label}), {rate:,.0f} tokens/s, ETA {eta:.0f} s")
            self.last = now

    def note(self, line: str) -> None:
        if self.write:
            self.write(f"[features] {line}")


def _default_write(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _sha256(path: str | None) -> str | None:
    if not path:
        return None
    f = Path(path) / "sae_weights.safetensors"
    if not f.is_file():
        return None
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def predict_memory(d_saes: Sequence[int], d_ins: Sequence[int], n_datasets: int, opts: FeatureOptions, *,
                   model_bytes: int, context_size: int, d_model: int, vocab: int) -> dict[str, int]:
    """Predicted peak resident bytes: ``model_bytes`` (the process as it stands, model and SAEs loaded, when the
    caller measured it) + accumulators (all SAEs x datasets) + the larger of one streaming step (chunk temporaries
    + forward) and the finalisation temporaries."""
    per_lat = LatentAccumulator.bytes_per_latent(opts.n_candidates, opts.reservoir, opts.hist_bins)
    acc = sum(d * per_lat for d in d_saes) * n_datasets
    saes = sum(4 * (2 * d * di + d + di) for d, di in zip(d_saes, d_ins))
    d_max = max(d_saes)
    chunk = chunk_tokens(opts, d_max)
    step = chunk * d_max * 4 * 8 + chunk * (opts.n_candidates + opts.reservoir) * 0 + \
        opts.batch_size * context_size * d_model * 4 * 24
    fin = max(1024 * d_max * 4 * 2, 256 * vocab * 4 * 4, d_max * (opts.n_candidates + opts.reservoir) * 16 * 3)
    return {"model": int(model_bytes), "saes": saes, "accumulators": acc, "step": int(step), "finalize": int(fin),
            "peak": int(model_bytes + acc + max(step, fin)), "chunk_tokens": chunk}


def current_rss_bytes() -> int | None:
    """Resident memory of this process now (Linux /proc), or None where unavailable."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def chunk_tokens(opts: FeatureOptions, d_sae: int) -> int:
    if opts.chunk_tokens:
        return int(opts.chunk_tokens)
    return int(min(4096, max(64, (256 << 20) // max(1, d_sae * 4 * 8))))


def _gib(b: int) -> str:
    return f"{b / (1 << 30):.2f} GiB"


def _is_feature_store(path: Path) -> bool:
    """Whether ``path`` is an SQLite file whose meta table names our store format (finished or not)."""
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            fmt = dict(conn.execute("SELECT key, value FROM meta")).get("format")
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return False
    return fmt is not None and json.loads(fmt) == FORMAT


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise UserError(f"{out} is a directory; give --out a file name for the store, e.g. {out / 'features.sqlite'}.")
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it, or choose another --out.")
    if out.exists() and not _is_feature_store(out):
        raise UserError(f"{out} exists and is not a domain-sae feature store; --overwrite replaces only a feature "
                        f"store, never another file. Move it away or choose another --out.")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out.parent, out.name)  # left by a killed build


def build_feature_store(saes: SAESet, data: HeldoutData, out: str | Path, *, n_tokens: int = 0,
                        cfg: EvalConfig | None = None, lm: Any = None, device: str = "cpu",
                        options: FeatureOptions | None = None, overwrite: bool = False,
                        write: Callable[[str], None] | None = _default_write) -> Path:
    """Build the store at ``out`` (an SQLite file) for the SAEs of ``saes`` on ``data``: ``n_tokens`` held-out tokens
    of each dataset spec drawn live, or each held-out cache's sample and activations (`dsae cache --split heldout`;
    ``n_tokens`` unused) without running the model (it is loaded for the tokenizer and the unembedding of the logit
    effects). ``cfg`` (an :class:`~domain_sae.config.EvalConfig`): held-out options and hook; its null ones come from
    the SAEs' metadata as for `dsae eval` (the model too; ``lm``: a LoadedModel to reuse). The SAEs pass the one
    compatibility check of :class:`~domain_sae.evaluation.sae_set.SAESet` against the model. Returns ``out``. Reason
    for the length: it is the orchestration of the whole build (checks, prediction, pass, finalisation, atomic
    rename) kept in one readable place."""
    from ..models.hooks import capture, hook_d_in, resolve_hook
    from ..models.load import load_model
    opts = options or FeatureOptions()
    opts.check()
    out = Path(out)
    if n_tokens <= 0 and not data.from_cache:
        raise UserError(f"--tokens must be positive (got {n_tokens}).")
    _prepare_out(out, overwrite)
    cfg = cfg or EvalConfig()
    saes = saes.at_hook(cfg.hook)
    cfg, _ = saes.heldout_config(cfg, model_name=None if lm is None else lm.name)
    lm = lm if lm is not None else load_model(cfg.model, device=device)
    net = lm.model
    points = {h: resolve_hook(net, h) for h in saes.hooks}
    widths = {h: hook_d_in(net, p) for h, p in points.items()}
    saes.check(model=lm.name, width=widths.__getitem__)
    sets = data.sets(cfg, tokenizer=lm.tokenizer, n_tokens=n_tokens, hooks=saes.hooks, model=lm.name)
    for ds in sets:
        if ds.caches and next(iter(ds.caches.values())).manifest["exclude_special"] and not opts.exclude_special:
            raise UserError(f"The activation cache {ds.cache_path} holds no special-token positions, but the store "
                            f"is asked to include them (exclude_special=False); build the store from the live model "
                            f"(--data).")
    if data.from_cache:
        n_tokens = max(int(ds.input_ids.numel()) for ds in sets)
    ctx = max(int(ds.input_ids.shape[1]) for ds in sets)
    entries = list(saes)
    model_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    vocab = int(net.get_output_embeddings().weight.shape[0]) if net.get_output_embeddings() is not None else 0
    rss = current_rss_bytes()   # the process now: interpreter, libraries, model and SAEs
    pred = predict_memory([e.d_sae for e in entries], [e.d_in for e in entries], len(sets), opts,
                          model_bytes=rss if rss else model_bytes + sum(4 * 2 * e.d_sae * e.d_in for e in entries),
                          context_size=ctx, d_model=max(widths.values()), vocab=vocab)
    disk = sum(n_tokens * w * 4 for w in widths.values()) * len(sets)
    prog = Progress(-(-n_tokens // ctx) * ctx * len(sets), write)
    prog.note(f"{len(entries)} SAE(s) x {len(sets)} dataset(s), {n_tokens:,} held-out tokens each; predicted peak "
              f"memory {_gib(pred['peak'])} (process now {_gib(pred['model'])}, "
              f"statistics {_gib(pred['accumulators'])}, "
              f"per step {_gib(max(pred['step'], pred['finalize']))}); activation spill on disk {_gib(disk)}.")
    if opts.max_memory_gb is not None and pred["peak"] > opts.max_memory_gb * (1 << 30):
        raise UserError(f"The build is predicted to need {_gib(pred['peak'])}, above --max-memory-gb "
                        f"{opts.max_memory_gb}; lower --reservoir, --top-k or --tokens, or build one SAE at a time.")
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        db = tmp / "store.sqlite"
        conn = sqlite3.connect(db)
        create_schema(conn)
        edges = hist_edges(opts.hist_lo, opts.hist_hi, opts.hist_bins)
        seq_ids, seq_texts, spills, ds_rows = [], [], [], []
        gates: list[list[np.ndarray]] = [[] for _ in entries]
        accs = [[LatentAccumulator(e.d_sae, n_candidates=opts.n_candidates, reservoir=opts.reservoir, edges=edges,
                                   seed=opts.seed * 1_000_003 + 7919 * j + k) for k in range(len(sets))]
                for j, e in enumerate(entries)]
        chunk = pred["chunk_tokens"]
        for k, ds in enumerate(sets):
            ids, segs = ds.input_ids, ds.segments
            mask = training_mask(segs, opts.exclude_special)   # the positions SAE training and eval use
            seq_ids.append(ids)
            ds_rows.append((k, ds.spec, int(ids.numel()), int(mask.sum())))
            seq_texts.append(_write_sequences(conn, k, ids, segs, lm.tokenizer))
            spill = {h: np.lib.format.open_memmap(tmp / f"acts_{k}_{i}.npy", mode="w+", dtype=np.float32,
                                                  shape=(ids.shape[0], ids.shape[1], widths[h]))
                     for i, h in enumerate(sorted(points))}
            spills.append(spill)
            for j in range(len(entries)):  # tau: the smallest non-zero activation per position (finalize.py)
                gates[j].append(np.full(tuple(ids.shape), np.inf, dtype=np.float32))
            for h in ds.caches:  # the cached activations, NaN where none is held
                for s0, a in ds.activations(h, opts.batch_size):
                    spill[h][s0:s0 + a.shape[0]] = a.numpy()
            T = ids.shape[1]
            for s0 in range(0, ids.shape[0], opts.batch_size):
                b_ids = ids[s0:s0 + opts.batch_size].to(lm.device)
                b_mask = mask[s0:s0 + opts.batch_size]
                loc = (torch.arange(s0, s0 + b_ids.shape[0])[:, None] * T + torch.arange(T)[None])[b_mask]
                for h, p in points.items():
                    if ds.caches:
                        a = torch.from_numpy(np.array(spill[h][s0:s0 + b_ids.shape[0]])).to(lm.device)
                    else:
                        a = capture(net, p, b_ids).to(torch.float32)
                        spill[h][s0:s0 + b_ids.shape[0]] = a.cpu().numpy()
                    x = a[b_mask.to(a.device)]
                    for j, e in enumerate(entries):
                        if e.hook != h:
                            continue
                        with torch.no_grad():
                            for c0 in range(0, x.shape[0], chunk):
                                f = e.sae.encode(x[c0:c0 + chunk])
                                accs[j][k].update(f, loc[c0:c0 + chunk])
                                tau = f.masked_fill(f <= 0, float("inf")).amin(-1)
                                gates[j][k].reshape(-1)[loc[c0:c0 + chunk].cpu().numpy()] = tau.cpu().numpy()
                prog.advance(int(b_ids.numel()), ds.spec)
        conn.executemany("INSERT INTO datasets VALUES (?, ?, ?, ?)", ds_rows)
        sae_rows = []
        for j, e in enumerate(entries):
            prog.note(f"finalising {e.label}: examples, histograms, logit effects, neighbours")
            sha = _sha256(e.path)
            sae_rows.append({"sae_id": j, "label": e.label, "path": e.path, "sha256": sha, "hook": e.hook,
                             "d_in": e.d_in, "d_sae": e.d_sae})
            conn.execute("INSERT INTO saes VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (j, e.label, e.path, sha, e.hook, e.d_in, e.d_sae, json.dumps(e.metadata, default=str)))
            finalize_sae(conn, j, e.sae, accs[j], seq_ids, seq_texts, [sp[e.hook] for sp in spills], opts, lm,
                         gates[j])
            accs[j], gates[j] = [], []  # free
        write_comparisons(conn, [e.sae for e in entries], [e.path for e in entries], [e.hook for e in entries],
                          [e.metadata for e in entries], opts, prog.note)
        provenance = {
            "tool": "domain-sae", "tool_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                         time.gmtime()),
            "model": {"name": lm.name, "source": getattr(lm, "source", None), "family": getattr(lm, "family", None)},
            "saes": sae_rows,
            "datasets": [{"spec": r[1], "tokens": r[2], "kept_tokens": r[3]} for r in ds_rows],
            "data_config": {k: getattr(cfg, k) for k in ("context_size", "prepend_bos", "holdout_fraction")},
            "tokens_per_dataset_requested": int(n_tokens), "options": dataclasses.asdict(opts),
            "activation_caches": [str(ds.cache_path) for ds in sets if ds.caches] or None,
            "predicted_memory_bytes": pred, "build_seconds": round(time.perf_counter() - prog.t0, 2),
        }
        put_meta(conn, "provenance", provenance)
        put_meta(conn, "hist_edges", edges.tolist())
        put_meta(conn, "window", [opts.window_before, opts.window_after])
        put_meta(conn, "complete", True)
        conn.commit()
        conn.close()
        move_into_place(db, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    prog.note(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - prog.t0:.1f} s")
    return out


def _write_sequences(conn: sqlite3.Connection, ds: int, ids: torch.Tensor, segs: torch.Tensor, tokenizer
                     ) -> list[list[str]]:
    rows, texts = [], []
    for s in range(ids.shape[0]):
        seq = ids[s].tolist()
        texts.append(token_texts(tokenizer, seq))
        rows.append((ds, s, np.asarray(seq, dtype=np.int32).tobytes(), segs[s].numpy().astype(np.int8).tobytes(),
                     json.dumps(texts[-1], ensure_ascii=False)))
    conn.executemany("INSERT INTO sequences VALUES (?, ?, ?, ?, ?)", rows)
    return texts
