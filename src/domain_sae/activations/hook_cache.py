"""`dsae cache`: a model's activations at one or more hook points over a dataset, resumable, checksummed.

Layout of a cache directory ``CACHE``::

    .domain-sae.json           output marker (kind activation-cache)
    manifest.json              {"format": "domain-sae-hook-cache", "version": 2, "complete": bool, "model",
                                "hooks": {name: {"dir", "d_in"}}, "data": {data spec + held-out settings},
                                "split": "train" | "heldout", "context_size", "dtype", "exclude_special",
                                "tokens_requested", "n_tokens", "n_sequences", "sequences_per_shard",
                                "sampling": {held-out sample summary} (heldout only),
                                "shards": [{"n_tokens", "n_sequences", "files": {hook: {"file", "sha256"}},
                                            "sequences": {"file", "sha256"}}]}
    <hook>/manifest.json       the single-hook cache manifest of :mod:`.cache` (read by CachedActivationSource),
                               written when the build completes; its shards carry their sha256 too
    <hook>/shard_00000.safetensors   "activations" [n, d_in] (dtype), "token_ids" [n] int32, "positions" [n]
                               int32 (index within the sequence), "segments" [n] int8
    sequences/shard_00000.safetensors   the shard's whole sequences: "input_ids" [S, ctx] int32, "segments"
                               [S, ctx] int8 and, held-out only, "doc_ids" [S, ctx] int32 (document of each token,
                               -1 for inserted BOS/padding); the kept rows are their training-mask positions in order

One model forward per chunk of ``model_batch_size`` sequences, stopped after the deepest hook
(:func:`~domain_sae.models.hooks.capture_many`). Shard ``i`` holds the kept positions (training mask) of sequences
``[i S, (i + 1) S)``, ``S = sequences_per_shard``. ``split="train"`` (what `dsae train --activations` reads): the
training split in stream order, the last shard cut at the requested token count. ``split="heldout"`` (what
`dsae eval --activations` and `dsae features --activations` read): exactly the held-out sample of the evaluation,
``data.pipeline.heldout_batch(cfg, tokenizer, n_tokens)`` (windows from many documents, PAD masked out of attention
as in the evaluation's clean pass), every kept position of it. Each shard file is written atomically and the root
manifest is rewritten (atomically) after every shard, so a killed build continues from its last complete shard and
produces byte-identical files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import save_file

from ..util.atomic import atomic_file
from ..data.segments import PAD, training_mask
from ..models.hooks import capture_many, hook_d_in, resolve_hook
from ..util.jsonsafe import write_json
from ..util.outdirs import check_output_dir, prepare_output_dir, safe_component
from .cache import FORMAT as SHARD_FORMAT
from .cache import MANIFEST, CacheError
from .live import read_sequences

__all__ = ["build_cache", "read_root_manifest", "data_spec", "sha256_file", "HOOK_CACHE_FORMAT", "KIND", "SPLITS",
           "SEQUENCES_DIR"]

HOOK_CACHE_FORMAT = "domain-sae-hook-cache"
KIND = "activation-cache"
SPLITS = ("train", "heldout")
SEQUENCES_DIR = "sequences"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# DataConfig fields that do not change which tokens are cached (where the model runs, how fast).
_NOT_DATA = ("model", "hook", "device", "model_dtype", "model_batch_size", "streaming")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def data_spec(cfg) -> dict:
    """The options of a DataConfig that decide the cached tokens (dataset, split, held-out settings, context)."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if f.name not in _NOT_DATA and hasattr(cfg, f.name)}


def read_root_manifest(path: str | Path) -> Optional[dict]:
    """The root manifest of a `dsae cache` directory, or None when ``path`` has none (a single-hook cache)."""
    p = Path(path) / MANIFEST
    if not p.is_file():
        return None
    try:
        manifest = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CacheError(f"{p} is corrupt ({e}); rebuild the cache with dsae cache --overwrite.") from None
    return manifest if manifest.get("format") == HOOK_CACHE_FORMAT else None


def _identity(m: dict) -> dict:
    return {k: m.get(k, "train" if k == "split" else None)
            for k in ("model", "hooks", "data", "split", "context_size", "dtype", "exclude_special",
                      "tokens_requested", "sequences_per_shard")}


def _start(out: Path, spec: dict, overwrite: bool) -> dict:
    """The manifest to continue from: a fresh one, or that of an unfinished build of the same spec."""
    state = check_output_dir(out, KIND, overwrite=overwrite, option="--out")
    old = read_root_manifest(out) if state == "ours" else None
    if old is not None and not overwrite:
        if old.get("complete"):
            raise CacheError(f"{out} already holds a complete activation cache ({old['n_tokens']} tokens of "
                             f"{', '.join(old['hooks'])}); train from it with --activations {out}, or pass "
                             f"--overwrite to rebuild it.")
        diff = sorted(k for k, v in _identity(old).items() if spec.get(k) != v)
        if diff:
            raise CacheError(f"{out} holds an unfinished cache built with different options ({', '.join(diff)}); "
                             f"rerun with the same options to continue it, or pass --overwrite to start over.")
        listed: dict[Path, set] = {out / info["dir"]: set() for info in old["hooks"].values()}
        listed[out / SEQUENCES_DIR] = set()
        for shard in old["shards"]:
            for entry in list(shard["files"].values()) + ([shard["sequences"]] if "sequences" in shard else []):
                listed[(out / entry["file"]).parent].add(Path(entry["file"]).name)
        for folder, names in listed.items():  # drop anything after the last complete shard
            for f in folder.glob("*"):
                if f.name not in names:
                    f.unlink()
        return old
    if state == "ours" and old is None and not overwrite:
        raise CacheError(f"{out} already holds an activation cache; choose another --out or pass --overwrite.")
    prepare_output_dir(out, KIND, overwrite=overwrite, option="--out")
    manifest = {"format": HOOK_CACHE_FORMAT, "version": 2, "complete": False, **spec, "n_tokens": 0,
                "n_sequences": 0, "shards": []}
    for folder in [info["dir"] for info in spec["hooks"].values()] + [SEQUENCES_DIR]:
        (out / folder).mkdir(exist_ok=True)
    write_json(out / MANIFEST, manifest)
    return manifest


def _shard_plan(lm, hooks, n_tokens: int, context_size: int, model_batch_size: int, dtype: str,
                shard_tokens: Optional[int]) -> tuple[dict, int]:
    info, widest = {}, 1
    for h in hooks:
        d = hook_d_in(lm.model, h)
        info[h.name] = {"dir": safe_component(h.name, "--hook"), "d_in": d}
        widest = max(widest, d)
    if shard_tokens is None:  # about 256 MiB of activations per shard for the widest hook
        shard_tokens = max(1, (256 * 2**20) // (widest * _DTYPES[dtype].itemsize))
    shard_tokens = min(shard_tokens, n_tokens)
    chunks = max(1, -(-shard_tokens // (context_size * model_batch_size)))
    return info, chunks * model_batch_size


def build_cache(lm, hooks: list[str], cfg, out: str | Path, n_tokens: int, *, dtype: str = "float32",
                shard_tokens: Optional[int] = None, overwrite: bool = False, split: str = "train",
                on_shard: Optional[Callable[[int, dict], None]] = None) -> Path:
    """Cache the activations of ``lm`` at ``hooks`` over ``split`` of ``cfg`` (a DataConfig).

    ``split="train"``: the first ``n_tokens`` kept positions of the training split (the training mask: padding
    never, special tokens only with ``exclude_special_tokens`` off). ``split="heldout"``: every kept position of
    the evaluation's held-out sample of ``n_tokens`` tokens (module docstring). An unfinished build of the same
    options at ``out`` is continued from its last complete shard. ``on_shard(index, manifest)`` is called after
    each shard is durable (progress display).
    """
    from ..data.token_stream import TokenStream, heldout_batch  # pulls in the tokenizers; import it only to build
    out = Path(out)
    if dtype not in _DTYPES:
        raise CacheError(f"--dtype must be one of {', '.join(_DTYPES)} (got {dtype!r}).")
    if split not in SPLITS:
        raise CacheError(f"--split must be one of {', '.join(SPLITS)} (got {split!r}).")
    if n_tokens <= 0:
        raise CacheError(f"--tokens must be positive (got {n_tokens}).")
    names = list(dict.fromkeys(hooks))
    if not names:
        raise CacheError("Give at least one --hook to cache.")
    points = [resolve_hook(lm.model, h) for h in names]
    info, per_shard = _shard_plan(lm, points, n_tokens, cfg.context_size, cfg.model_batch_size, dtype,
                                  shard_tokens)
    spec = {"model": lm.name, "hooks": info, "data": data_spec(cfg), "split": split,
            "context_size": cfg.context_size, "dtype": dtype, "exclude_special": bool(cfg.exclude_special_tokens),
            "tokens_requested": int(n_tokens), "sequences_per_shard": per_shard}
    spec = json.loads(json.dumps(spec))  # the form it takes in the manifest (tuples -> lists)
    manifest = _start(out, spec, overwrite)
    if manifest.get("complete"):
        return out
    done = manifest["n_sequences"]
    doc_ids = None
    if split == "heldout":
        sample = heldout_batch(cfg, lm.tokenizer, n_tokens)
        manifest["sampling"] = sample.summary()
        it = iter(zip(sample.input_ids[done:], sample.segments[done:]))
        doc_ids = sample.doc_ids.to(torch.int32)
        room = sample.input_ids.numel()  # every kept position of the sample
    else:
        stream = TokenStream(cfg, lm.tokenizer, split="train", repeat=False)
        stream.skip(done)
        it, room = iter(stream), n_tokens
    device = next(lm.model.parameters()).device
    ended = False
    while manifest["n_tokens"] < room and not ended:
        rows, n_seq, ended = _read_shard(lm, points, it, device, per_shard, cfg, room - manifest["n_tokens"],
                                         dtype, masked_attention=split == "heldout")
        if n_seq == 0:
            break
        index = len(manifest["shards"])
        entry = {"n_tokens": int(rows["token_ids"].shape[0]), "n_sequences": n_seq, "files": {}}
        for name, acts in rows["activations"].items():
            file = f"{info[name]['dir']}/shard_{index:05d}.safetensors"
            _save_shard(out / file, {"activations": acts, "token_ids": rows["token_ids"],
                                     "positions": rows["positions"], "segments": rows["segments"]})
            entry["files"][name] = {"file": file, "sha256": sha256_file(out / file)}
        if doc_ids is not None:
            start = manifest["n_sequences"]
            rows["sequences"]["doc_ids"] = doc_ids[start:start + n_seq]
        file = f"{SEQUENCES_DIR}/shard_{index:05d}.safetensors"
        _save_shard(out / file, rows["sequences"])
        entry["sequences"] = {"file": file, "sha256": sha256_file(out / file)}
        manifest["shards"].append(entry)
        manifest["n_tokens"] += entry["n_tokens"]
        manifest["n_sequences"] += n_seq
        write_json(out / MANIFEST, manifest)
        if on_shard is not None:
            on_shard(index, manifest)
    return _finish(out, manifest, n_tokens if split == "train" else manifest["n_tokens"])


def _save_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


def _read_shard(lm, points, it, device, per_shard: int, cfg, room: int, dtype: str, masked_attention: bool):
    """Kept rows of the next ``per_shard`` sequences (cut at ``room`` tokens) and the sequences themselves:
    (rows, sequences read, ended). ``it`` yields ``(ids, segments)``."""
    acts: dict[str, list[torch.Tensor]] = {h.name: [] for h in points}
    ids_l, pos_l, seg_l, seqs = [], [], [], {"input_ids": [], "segments": []}
    n_seq = n_kept = 0
    ended = False
    while n_seq < per_shard and n_kept < room:
        chunk = read_sequences(it, min(cfg.model_batch_size, per_shard - n_seq))
        if chunk is None:
            ended = True
            break
        ids, segs = chunk
        seqs["input_ids"].append(ids.to(torch.int32))
        seqs["segments"].append(segs.to(torch.int8))
        n_seq += ids.shape[0]
        mask = training_mask(segs, cfg.exclude_special_tokens)
        valid = segs != PAD
        attn = valid.long().to(device) if masked_attention and not bool(valid.all()) else None
        got = capture_many(lm.model, points, ids.to(device), attention_mask=attn)
        for name, a in got.items():
            a32 = a[mask.to(a.device)].to("cpu", torch.float32)
            a_cast = a32.to(_DTYPES[dtype])
            if not torch.isfinite(a_cast).all() and torch.isfinite(a32).all():
                raise CacheError(f"Activations at {name} overflow {dtype} (max |x| = {a32.abs().max():.4g}); "
                                 f"build the cache with --dtype float32 or bfloat16.")
            acts[name].append(a_cast)
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        ids_l.append(ids[mask].to(torch.int32))
        pos_l.append(positions[mask].to(torch.int32))
        seg_l.append(segs[mask].to(torch.int8))
        n_kept += int(mask.sum())
    if n_seq == 0:
        return {}, 0, True
    take = min(n_kept, room)
    rows = {"activations": {k: torch.cat(v)[:take] for k, v in acts.items()},
            "token_ids": torch.cat(ids_l)[:take], "positions": torch.cat(pos_l)[:take],
            "segments": torch.cat(seg_l)[:take], "sequences": {k: torch.cat(v) for k, v in seqs.items()}}
    return rows, n_seq, ended


def _finish(out: Path, manifest: dict, n_tokens: int) -> Path:
    """Write each hook's single-hook manifest (the format CachedActivationSource reads) and mark the build
    complete."""
    if manifest["n_tokens"] == 0:
        raise CacheError("The dataset gave no training positions; nothing to cache. Check --data and "
                         "--exclude-special-tokens.")
    if manifest["n_tokens"] < n_tokens:
        warnings.warn(f"The training split ended after {manifest['n_tokens']} kept positions; the cache at {out} "
                      f"holds {manifest['n_tokens']} of the {n_tokens} tokens asked for.", stacklevel=3)
    for name, info in manifest["hooks"].items():
        shards = [{"file": Path(s["files"][name]["file"]).name, "n_tokens": s["n_tokens"],
                   "sha256": s["files"][name]["sha256"]} for s in manifest["shards"]]
        meta = {"model_name": manifest["model"], "hook_name": name, "context_size": manifest["context_size"],
                "data": manifest["data"], "split": manifest.get("split", "train"), "root": "..",
                "positions_stored": True}
        single = {"format": SHARD_FORMAT, "version": 1, "d_in": info["d_in"], "n_tokens": manifest["n_tokens"],
                  "n_sequences": manifest["n_sequences"], "dtype": manifest["dtype"],
                  "exclude_special": manifest["exclude_special"], "shards": shards, "metadata": meta}
        write_json(out / info["dir"] / MANIFEST, single)
    manifest["complete"] = True
    write_json(out / MANIFEST, manifest)
    return out
