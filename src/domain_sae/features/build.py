"""Build a feature store: one streaming pass per dataset over held-out tokens, then per-latent finalisation.

    build_feature_store(sae_dirs, datasets, n_tokens, out)   (what `dsae features` runs; the study can call it)

Per dataset, the held-out split (``data.pipeline.heldout_batch``, the split ``dsae eval`` uses, with the first SAE's
training context size, BOS and holdout fraction) is run through the model in batches of ``batch_size``
sequences, stopping at each hook (``models.hooks.capture``); every SAE at that hook encodes the kept positions in
chunks and a :class:`~.accumulate.LatentAccumulator` per (SAE, dataset) takes the statistics. Hook activations are
spilled to a float32 memory map in the build's temporary folder so that the context windows' activations can be
computed at the end without a second model pass. Memory is bounded (accumulators + one chunk) and predicted before
anything runs. The store is written under a temporary name and renamed when complete: a killed build leaves no
file at ``out`` (only a ``.tmp-`` folder beside it, removed by the next build).
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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..util.atomic import fsync_dir, fsync_file, remove_leftovers
from ..data.segments import training_mask
from ..errors import UserError
from .accumulate import LatentAccumulator, hist_edges
from .compare import write_comparisons
from .detok import token_texts
from .finalize import finalize_sae
from .options import FeatureOptions
from .schema import FORMAT, StoreError, create_schema, put_meta

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


def _labels(paths: Sequence[str]) -> list[str]:
    # a run directory's SAE lives in RUN/sae: name it after the run
    names = [(Path(p).parent.name if Path(p).name == "sae" and Path(p).parent.name else Path(p).name) or str(p)
             for p in paths]
    out = []
    for i, (p, n) in enumerate(zip(paths, names)):
        if names.count(n) > 1:
            parent = Path(p).parent.name
            n = f"{parent}/{n}" if parent and [Path(q).parent.name + "/" + Path(q).name for q in paths].count(
                f"{parent}/{n}") == 1 else f"{n}#{i}"
        out.append(n)
    return out


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


def _data_cfg(meta: Mapping[str, Any], spec: str, overrides: Mapping[str, Any]):
    from ..config import DataConfig
    cfg = DataConfig()
    values = {"data": spec}
    for key, mkey in (("context_size", "context_size"), ("prepend_bos", "prepend_bos"),
                      ("holdout_fraction", "holdout_fraction")):
        if meta.get(mkey) is not None:
            values[key] = type(getattr(cfg, key))(meta[mkey])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return dataclasses.replace(cfg, **values)


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


def build_feature_store(sae_dirs: Sequence[str | Path], datasets: Sequence[str], n_tokens: int, out: str | Path, *,
                        model: str | None = None, device: str = "cpu", lm: Any = None,
                        saes: Sequence[Any] | None = None, hook: str | None = None,
                        heldout: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                        data_overrides: Mapping[str, Any] | None = None,
                        options: FeatureOptions | None = None, overwrite: bool = False,
                        activations: Sequence[str | Path] | None = None,
                        write: Callable[[str], None] | None = _default_write) -> Path:
    """Build the store at ``out`` (an SQLite file) for ``sae_dirs`` (ours or SAELens's; or pass loaded ``saes``)
    on ``n_tokens`` held-out tokens of each dataset spec (``heldout`` may map a spec to ``(ids, segments)``), or,
    with ``activations`` (held-out caches of `dsae cache --split heldout`, one dataset each; ``datasets`` empty,
    ``n_tokens`` unused), on each cache's sample and activations without running the model (it is loaded for the
    tokenizer and the unembedding of the logit effects).
    ``model`` defaults to the first SAE's metadata model (``lm``: a LoadedModel to reuse); each SAE runs at its
    metadata hook unless ``hook`` is given. Returns ``out``. Reason for the length: it is the orchestration of
    the whole build (checks, prediction, pass, finalisation, atomic rename) kept in one readable place."""
    from ..models.hooks import capture, hook_d_in, resolve_hook
    from ..models.load import load_model
    from ..sae.io import load_sae
    opts = options or FeatureOptions()
    opts.check()
    out = Path(out)
    if activations and datasets:
        raise UserError("--data and --activations both choose the data; give one of them (a held-out cache is one "
                        "dataset).")
    if not datasets and not activations:
        raise UserError("No dataset given; pass --data chat, --data code or a file.")
    if n_tokens <= 0 and not activations:
        raise UserError(f"--tokens must be positive (got {n_tokens}).")
    _prepare_out(out, overwrite)
    paths = [str(p) for p in sae_dirs] if sae_dirs else [f"sae_{i}" for i in range(len(saes or []))]
    saes = list(saes) if saes is not None else [load_sae(p) for p in paths]
    if not saes:
        raise UserError("No SAE given; pass one or more SAE directories.")
    labels = _labels(paths)
    metas = [dict(getattr(s.cfg, "metadata", None) or {}) for s in saes]
    lm = lm if lm is not None else load_model(model or metas[0].get("model_name") or "smollm2-135m-instruct",
                                              device=device)
    net = lm.model
    hooks = [hook or m.get("hook_name") or "blocks.0.hook_mlp_out" for m in metas]
    points = {h: resolve_hook(net, h) for h in set(hooks)}
    widths = {h: hook_d_in(net, p) for h, p in points.items()}
    for lab, s, h in zip(labels, saes, hooks):
        if s.d_in != widths[h]:
            raise UserError(f"SAE {lab} has d_in={s.d_in} but hook {h} of {lm.name} has width {widths[h]}; pass "
                            f"SAEs trained on this model and hook (or --hook).")
    caches = _open_caches(activations, points, widths, lm.name, metas[0], data_overrides or {}, opts) \
        if activations else []
    samples = [next(iter(c.values())) for c in caches]  # any hook's view: the same sample and sequences
    if caches:
        datasets = [c.data for c in samples]
        n_tokens = max(int(c.input_ids.numel()) for c in samples)
    dcfgs = [_data_cfg(metas[0], str(spec), data_overrides or {}) for spec in datasets]
    ctx = dcfgs[0].context_size
    model_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    vocab = int(net.get_output_embeddings().weight.shape[0]) if net.get_output_embeddings() is not None else 0
    rss = current_rss_bytes()   # the process now: interpreter, libraries, model and SAEs
    pred = predict_memory([s.d_sae for s in saes], [s.d_in for s in saes], len(datasets), opts,
                          model_bytes=rss if rss else model_bytes + sum(4 * 2 * s.d_sae * s.d_in for s in saes),
                          context_size=ctx, d_model=max(widths.values()), vocab=vocab)
    disk = sum(n_tokens * w * 4 for w in widths.values()) * len(datasets)
    prog = Progress(-(-n_tokens // ctx) * ctx * len(datasets), write)
    prog.note(f"{len(saes)} SAE(s) x {len(datasets)} dataset(s), {n_tokens:,} held-out tokens each; predicted peak "
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
        seq_ids, seq_segs, seq_texts, masks, spills, ds_rows = [], [], [], [], [], []
        gates: list[list[np.ndarray]] = [[] for _ in saes]
        accs = [[LatentAccumulator(s.d_sae, n_candidates=opts.n_candidates, reservoir=opts.reservoir, edges=edges,
                                   seed=opts.seed * 1_000_003 + 7919 * j + k) for k in range(len(datasets))]
                for j, s in enumerate(saes)]
        chunk = pred["chunk_tokens"]
        for k, (spec, dcfg) in enumerate(zip(datasets, dcfgs)):
            if caches:
                ids, segs = samples[k].input_ids, samples[k].segments
            else:
                ids, segs = _heldout_tokens(spec, dcfg, lm.tokenizer, n_tokens, heldout)
            mask = training_mask(segs, opts.exclude_special)   # the positions SAE training and eval use
            seq_ids.append(ids)
            seq_segs.append(segs)
            masks.append(mask)
            ds_rows.append((k, str(spec), int(ids.numel()), int(mask.sum())))
            seq_texts.append(_write_sequences(conn, k, ids, segs, lm.tokenizer))
            spill = {h: np.lib.format.open_memmap(tmp / f"acts_{k}_{i}.npy", mode="w+", dtype=np.float32,
                                                  shape=(ids.shape[0], ids.shape[1], widths[h]))
                     for i, h in enumerate(sorted(points))}
            spills.append(spill)
            for j in range(len(saes)):  # tau: the smallest non-zero activation per position (finalize.py)
                gates[j].append(np.full(tuple(ids.shape), np.inf, dtype=np.float32))
            for h, c in (caches[k].items() if caches else ()):  # the cached activations, NaN where none is held
                for s0, a in c.batches(opts.batch_size):
                    spill[h][s0:s0 + a.shape[0]] = a.numpy()
            T = ids.shape[1]
            for s0 in range(0, ids.shape[0], opts.batch_size):
                b_ids = ids[s0:s0 + opts.batch_size].to(lm.device)
                b_mask = mask[s0:s0 + opts.batch_size]
                loc = (torch.arange(s0, s0 + b_ids.shape[0])[:, None] * T + torch.arange(T)[None])[b_mask]
                for h, p in points.items():
                    if caches:
                        a = torch.from_numpy(np.array(spill[h][s0:s0 + b_ids.shape[0]])).to(lm.device)
                    else:
                        a = capture(net, p, b_ids).to(torch.float32)
                        spill[h][s0:s0 + b_ids.shape[0]] = a.cpu().numpy()
                    x = a[b_mask.to(a.device)]
                    for j, s in enumerate(saes):
                        if hooks[j] != h:
                            continue
                        with torch.no_grad():
                            for c0 in range(0, x.shape[0], chunk):
                                f = s.encode(x[c0:c0 + chunk])
                                accs[j][k].update(f, loc[c0:c0 + chunk])
                                tau = f.masked_fill(f <= 0, float("inf")).amin(-1)
                                gates[j][k].reshape(-1)[loc[c0:c0 + chunk].cpu().numpy()] = tau.cpu().numpy()
                prog.advance(int(b_ids.numel()), f"{spec}")
        conn.executemany("INSERT INTO datasets VALUES (?, ?, ?, ?)", ds_rows)
        sae_rows = []
        for j, (lab, path, s, h, m) in enumerate(zip(labels, paths, saes, hooks, metas)):
            prog.note(f"finalising {lab}: examples, histograms, logit effects, neighbours")
            sha = _sha256(path)
            sae_rows.append({"sae_id": j, "label": lab, "path": path, "sha256": sha, "hook": h, "d_in": s.d_in,
                             "d_sae": s.d_sae})
            conn.execute("INSERT INTO saes VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (j, lab, path, sha, h, s.d_in, s.d_sae, json.dumps(m, default=str)))
            finalize_sae(conn, j, s, accs[j], seq_ids, seq_texts, [sp[h] for sp in spills], opts, lm, gates[j])
            accs[j], gates[j] = [], []  # free
        write_comparisons(conn, saes, paths, hooks, metas, opts, prog.note)
        provenance = {
            "tool": "domain-sae", "tool_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                         time.gmtime()),
            "model": {"name": lm.name, "source": getattr(lm, "source", None), "family": getattr(lm, "family", None)},
            "saes": sae_rows,
            "datasets": [{"spec": r[1], "tokens": r[2], "kept_tokens": r[3]} for r in ds_rows],
            "data_config": {k: getattr(dcfgs[0], k) for k in ("context_size", "prepend_bos", "holdout_fraction")},
            "tokens_per_dataset_requested": int(n_tokens), "options": dataclasses.asdict(opts),
            "activation_caches": [str(c.path) for c in samples] or None,
            "predicted_memory_bytes": pred, "build_seconds": round(time.perf_counter() - prog.t0, 2),
        }
        put_meta(conn, "provenance", provenance)
        put_meta(conn, "hist_edges", edges.tolist())
        put_meta(conn, "window", [opts.window_before, opts.window_after])
        put_meta(conn, "complete", True)
        conn.commit()
        conn.close()
        fsync_file(db)
        os.replace(db, out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    prog.note(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - prog.t0:.1f} s")
    return out


def _open_caches(paths, points, widths, model_name, meta, overrides, opts) -> list[dict]:
    """{hook: HeldoutCache} per cache path, each checked against the model, the SAEs' hooks and held-out data."""
    from ..activations.heldout_cache import heldout_data_mismatch, open_heldout_cache
    out = []
    for path in paths:
        opened = {h: open_heldout_cache(path, h) for h in sorted(points)}
        for h, c in opened.items():
            problems = heldout_data_mismatch(c, _data_cfg(meta, c.data, overrides), model=model_name)
            if c.d_in != widths[h]:
                problems.append(f"width {c.d_in} at {h} (the model's: {widths[h]})")
            if c.manifest["exclude_special"] and not opts.exclude_special:
                problems.append("no special-token positions (the store is asked to include them)")
            if problems:
                raise UserError(f"The activation cache {c.path} does not fit this feature store: it holds "
                                f"{'; '.join(problems)}. Build the cache with the SAEs' options (dsae cache --split "
                                f"heldout ...) or build the store from the live model (--data).")
        out.append(opened)
    return out


def _heldout_tokens(spec, dcfg, tokenizer, n_tokens, heldout) -> tuple[torch.Tensor, torch.Tensor]:
    from ..data.token_stream import heldout_batch
    if heldout is not None and spec in heldout:
        ids, segs = heldout[spec]
    else:
        ids, segs = heldout_batch(dcfg, tokenizer, n_tokens)
    ids, segs = torch.as_tensor(ids).to(torch.int64).cpu(), torch.as_tensor(segs).to(torch.int8).cpu()
    if ids.ndim != 2 or ids.numel() == 0:
        raise StoreError(f"The held-out split of {spec!r} gives no tokens; raise holdout_fraction or use more data.")
    return ids, segs


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
