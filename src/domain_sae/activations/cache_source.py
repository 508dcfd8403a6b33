"""Opening an activation cache for training (`dsae train --activations CACHE[/HOOK]`), with the checks that make
a wrong or damaged cache fail before any step: the cache must be complete, of the same model, hook, width and
context size as the training config, and every shard must match the sha256 in its manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..models.names import same_model_name
from .cache import CachedActivationSource, CacheError, read_manifest
from .hook_cache import read_root_manifest, sha256_file

__all__ = ["resolve_cache", "verify_checksums", "check_cache_matches", "open_training_cache", "meta_split"]


def resolve_cache(path: str | Path, hook: Optional[str] = None) -> Path:
    """The single-hook cache directory meant by ``path``: ``CACHE/HOOK`` as given, or, for a `dsae cache`
    directory, the sub-directory of ``hook`` (the only hook when the cache holds one)."""
    p = Path(path)
    if not p.exists():
        raise CacheError(f"The activation cache {p} does not exist; build it with dsae cache --out {p} ...")
    root = read_root_manifest(p)
    if root is None:
        parent = read_root_manifest(p.parent) if p.parent != p else None
        if parent is not None and not parent.get("complete"):
            raise _unfinished(p.parent)
        return p
    if not root.get("complete"):
        raise _unfinished(p)
    hooks = root["hooks"]
    if hook in hooks:
        return p / hooks[hook]["dir"]
    if hook is None and len(hooks) == 1:
        return p / next(iter(hooks.values()))["dir"]
    raise CacheError(f"The activation cache {p} holds hooks {', '.join(hooks)}, not {hook}. Set --hook to one of "
                     f"them, or name the hook's folder: --activations {p}/<hook>.")


def _unfinished(p: Path) -> CacheError:
    return CacheError(f"The activation cache {p} is unfinished (its build was interrupted); rerun the same dsae "
                      f"cache command to complete it, then train from it.")


def verify_checksums(path: Path, manifest: dict) -> None:
    """Refuse a shard whose sha256 differs from the manifest's (damaged or replaced files)."""
    for shard in manifest["shards"]:
        want = shard.get("sha256")
        if want is None:
            continue  # older single-hook caches carry no checksums
        got = sha256_file(path / shard["file"])
        if got != want:
            raise CacheError(f"Shard {path / shard['file']} of the activation cache is corrupt: its sha256 is "
                             f"{got[:16]}..., the manifest says {want[:16]}.... Rebuild the cache with dsae cache "
                             f"--overwrite (or delete the cache and build it again).")


def check_cache_matches(manifest: dict, *, model: str, hook: str, d_in: int, context_size: int,
                        path: Path) -> None:
    """Refuse a cache made for another model, hook, width or context size than the training config."""
    meta = manifest.get("metadata") or {}
    problems = []
    if meta.get("model_name") is not None and not same_model_name(str(meta["model_name"]), str(model)):
        problems.append(f"model {meta['model_name']} (config: {model})")
    if meta.get("hook_name") is not None and meta["hook_name"] != hook:
        problems.append(f"hook {meta['hook_name']} (config: {hook})")
    if int(manifest["d_in"]) != int(d_in):
        problems.append(f"d_in {manifest['d_in']} (the config's hook has d_in {d_in})")
    if meta.get("context_size") is not None and int(meta["context_size"]) != int(context_size):
        problems.append(f"context_size {meta['context_size']} (config: {context_size})")
    if problems:
        raise CacheError(f"The activation cache {path} does not match the training config: it holds "
                         f"{'; '.join(problems)}. Train with the cache's options (--model, --hook, "
                         f"--context-size) or build a cache for this config with dsae cache.")


def meta_split(manifest: dict) -> str:
    """The split a single-hook cache manifest holds ("train" for caches that predate the field)."""
    return str((manifest.get("metadata") or {}).get("split", "train"))


def open_training_cache(cfg, *, model_name: str, d_in: int, verify: bool = True,
                        shard: tuple[int, int] = (0, 1)) -> CachedActivationSource:
    """The activation source of ``cfg.activations`` for a training run of ``cfg`` (checked as above); with
    ``shard=(r, W)``, rank r's contiguous slice, serving its ``1 / W`` of every batch and buffer."""
    path = resolve_cache(cfg.activations, cfg.hook)
    manifest = read_manifest(path)
    check_cache_matches(manifest, model=model_name, hook=cfg.hook, d_in=d_in, context_size=cfg.context_size,
                        path=path)
    if meta_split(manifest) != "train":
        raise CacheError(f"The activation cache {path} holds the held-out split (built with dsae cache --split "
                         f"heldout, for dsae eval and dsae features); training never reads held-out data. Build a "
                         f"training cache with dsae cache --split train (the default).")
    # A cache with special-token positions serves a config without them (filtered at read time), not the reverse.
    if manifest["exclude_special"] and not cfg.exclude_special_tokens:
        raise CacheError(f"The activation cache {path} was built without special-token positions, but the config "
                         f"trains on them (exclude_special_tokens=false). Build the cache with "
                         f"--no-exclude-special-tokens or train with exclude_special_tokens=true.")
    if cfg.training_tokens > int(manifest["n_tokens"]):
        raise CacheError(f"training_tokens ({cfg.training_tokens}) exceeds the {manifest['n_tokens']} tokens of the "
                         f"activation cache {path}; lower training_tokens or build a larger cache (dsae cache "
                         f"--tokens N).")
    if verify:
        verify_checksums(path, manifest)
    world = int(shard[1])
    return CachedActivationSource(path, batch_size=cfg.train_batch_size_tokens // world,
                                  buffer_tokens=cfg.buffer_size_tokens // world, seed=cfg.seed,
                                  exclude_special=cfg.exclude_special_tokens, shard=shard)
