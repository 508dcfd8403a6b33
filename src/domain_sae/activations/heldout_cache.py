"""Reading a held-out activation cache (`dsae cache --split heldout`) for `dsae eval --activations` and
`dsae features --activations` (through ``evaluation.heldout_data.HeldoutData``): the evaluation's held-out sample
and its activations at one hook, with no model.

:func:`open_heldout_cache` checks that the cache is complete, holds the held-out split and the hook, and (unless
``verify=False``) that every shard of that hook and every sequence file matches its sha256. The
:class:`HeldoutCache` it returns gives the sample (``input_ids``, ``segments``, ``doc_ids`` [N, T], exactly what
``data.token_stream.heldout_batch`` gave the build) and :meth:`HeldoutCache.batches`, the activations as [b, T, d]
float32 blocks of whole sequences, rebuilt from the stored rows: the cache holds the training-mask positions of
each sequence in order, so ``a[mask] = rows``; positions the cache does not hold (padding, and special tokens when
it was built with ``exclude_special_tokens``) are NaN, so reading one by mistake cannot pass unnoticed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors.torch import load_file

from ..data.segments import training_mask
from ..models.names import same_model_name
from .cache import CacheError
from .hook_cache import read_root_manifest, sha256_file

__all__ = ["HeldoutCache", "open_heldout_cache", "heldout_data_mismatch"]

# DataConfig fields that decide the held-out sample but may differ without changing it (how it is computed or which
# positions an SAE trains on; the reconstruction metrics never use special-token positions).
_SAMPLE_NEUTRAL = ("data", "exclude_special_tokens")


@dataclass
class HeldoutCache:
    """A complete held-out cache opened at one hook (see the module docstring)."""

    path: Path
    manifest: dict
    hook: str
    d_in: int
    input_ids: torch.Tensor
    segments: torch.Tensor
    doc_ids: torch.Tensor

    @property
    def data(self) -> str:
        """The dataset spec the cache was built from (``--data``)."""
        return str(self.manifest["data"].get("data"))

    @property
    def model(self) -> str:
        return str(self.manifest["model"])

    def batches(self, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first sequence index, activations [b, T, d_in] float32)`` over the sample in order, NaN where the cache
        holds no activation."""
        exclude = bool(self.manifest["exclude_special"])
        start = 0
        for shard in self.manifest["shards"]:
            rows = load_file(str(self.path / shard["files"][self.hook]["file"]))["activations"]
            n_seq = int(shard["n_sequences"])
            segs = self.segments[start:start + n_seq]
            mask = training_mask(segs, exclude)
            if int(mask.sum()) != rows.shape[0]:
                raise CacheError(f"Shard {shard['files'][self.hook]['file']} of {self.path} holds {rows.shape[0]} "
                                 f"rows for {int(mask.sum())} kept positions; the cache is damaged. Rebuild it "
                                 f"with dsae cache --split heldout --overwrite.")
            full = torch.full((n_seq, segs.shape[1], self.d_in), float("nan"), dtype=torch.float32)
            full[mask] = rows.to(torch.float32)
            for b0 in range(0, n_seq, batch_size):
                yield start + b0, full[b0:b0 + batch_size]
            start += n_seq


def _unusable(path: Path, why: str) -> CacheError:
    return CacheError(f"{path} cannot be evaluated from: {why}. Build a held-out cache with dsae cache "
                      f"--split heldout --out {path} --hook HOOK --tokens N ... (the evaluation's held-out sample).")


def open_heldout_cache(path: str | Path, hook: Optional[str] = None, *, verify: bool = True) -> HeldoutCache:
    """The held-out cache at ``path`` (a `dsae cache` directory, or its ``<hook>`` folder), opened at ``hook``
    (default: the folder's hook, or the only hook)."""
    p = Path(path)
    if not p.exists():
        raise _unusable(p, "it does not exist")
    root = read_root_manifest(p)
    if root is None and read_root_manifest(p.parent) is not None:
        folder = p.name
        p, root = p.parent, read_root_manifest(p.parent)
        named = [h for h, info in root["hooks"].items() if info["dir"] == folder]
        hook = hook or (named[0] if named else None)
    if root is None:
        raise _unusable(p, "it is not a dsae cache directory (no manifest.json of format domain-sae-hook-cache)")
    if not root.get("complete"):
        raise _unusable(p, "its build is unfinished (rerun the same dsae cache command to complete it)")
    if root.get("split", "train") != "heldout":
        raise _unusable(p, "it holds the training split; evaluating on training data would overstate every "
                           "metric")
    hooks = root["hooks"]
    if hook is None and len(hooks) == 1:
        hook = next(iter(hooks))
    if hook not in hooks:
        raise CacheError(f"The activation cache {p} holds hooks {', '.join(hooks)}, not {hook}; evaluate SAEs of "
                         f"one of those hooks, or build a cache of {hook} with dsae cache --split heldout.")
    if verify:
        for shard in root["shards"]:
            for entry in (shard["files"][hook], shard["sequences"]):
                if sha256_file(p / entry["file"]) != entry["sha256"]:
                    raise CacheError(f"{p / entry['file']} of the activation cache is corrupt (its sha256 differs "
                                     f"from the manifest's); rebuild the cache with dsae cache --split heldout "
                                     f"--overwrite.")
    seqs = [load_file(str(p / s["sequences"]["file"])) for s in root["shards"]]
    return HeldoutCache(path=p, manifest=root, hook=hook, d_in=int(hooks[hook]["d_in"]),
                        input_ids=torch.cat([s["input_ids"] for s in seqs]).to(torch.int64),
                        segments=torch.cat([s["segments"] for s in seqs]).to(torch.int8),
                        doc_ids=torch.cat([s["doc_ids"] for s in seqs]).to(torch.int64))


def heldout_data_mismatch(cache: HeldoutCache, cfg, *, model: Optional[str] = None) -> list[str]:
    """What differs between the cache's held-out sample and the one ``cfg`` (a DataConfig or EvalConfig with its
    held-out options resolved) would draw of the cache's dataset: ``["holdout_fraction 0.1 (config: 0.05)", ...]``;
    empty when they are the same sample (``model``: the model the SAEs were trained on, when known)."""
    out = []
    if model and not same_model_name(cache.model, model):
        out.append(f"model {cache.model} (SAEs: {model})")
    for key, value in cache.manifest["data"].items():
        if key in _SAMPLE_NEUTRAL or not hasattr(cfg, key):
            continue
        want = getattr(cfg, key)
        if want is not None and want != value and not (isinstance(value, list) and list(want or ()) == value):
            out.append(f"{key} {value} (config: {want})")
    return out
