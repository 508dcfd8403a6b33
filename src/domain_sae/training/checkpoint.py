"""Atomic training checkpoints: everything needed to continue a run bit-for-bit.

A checkpoint is a directory ``run_dir/checkpoints/<kind>_<step:09d>`` (kind ``step`` for the evenly spaced and
final ones, ``resume`` for the rolling time-based one) holding::

    sae_weights.safetensors      the SAE's state_dict at TRAINING scale (NOT folded; see trainer_state.json)
    optimizer.safetensors        Adam moments and step counts, keys "state.<param index>.<name>"
    training_state.safetensors   sparsity tracker tensors ("sparsity.*") and torch RNG states ("rng.*")
    trainer_state.json           {"format", "version", "step", "tokens", "activation_scale", "folded": false,
                                  "source": <activation source state>, "sparsity": {...}, "rng": {python, numpy},
                                  "optimizer": {param_groups, scalar state}, "config": {...}, "trainer": {...}}
    sae/                         (evenly spaced checkpoints) a usable SAE: activation scale folded in, sae.save()

Writes are atomic: everything goes into ``<name>.tmp-XXXX`` in the same directory, every file is fsync'ed, then
the directory is renamed with ``os.replace``. A crash at any moment leaves either the complete new checkpoint or
none, and never touches the previous ones. Loading never unpickles (safetensors + JSON only).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..util.atomic import atomic_directory
from ..errors import UserError

__all__ = [
    "CheckpointError", "TrainingCheckpoint", "save_checkpoint", "load_checkpoint", "latest_checkpoint",
    "list_checkpoints", "remove_checkpoint", "checkpoint_dir", "capture_rng_state", "restore_rng_state",
    "atomic_directory", "CHECKPOINTS", "STATE_FILE",
]

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
FORMAT = "domain-sae-training-checkpoint"
_NAME = re.compile(r"^(step|resume)_(\d+)$")


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete or does not match the run being resumed."""


@dataclass
class TrainingCheckpoint:
    path: Path
    state: dict                          # trainer_state.json
    sae_state: dict[str, torch.Tensor]   # unfolded, training scale
    optimizer_state: dict                # ready for optimizer.load_state_dict
    sparsity_state: dict                 # ready for SparsityTracker.load_state_dict
    rng_state: dict                      # ready for restore_rng_state

    @property
    def step(self) -> int:
        return int(self.state["step"])


# -- filesystem helpers ----------------------------------------------------------------------------------------------




def remove_checkpoint(path: str | Path) -> None:
    """Delete a checkpoint so that it is never seen half-deleted (renamed out of the way first)."""
    path = Path(path)
    if not path.exists():
        return
    trash = Path(tempfile.mkdtemp(prefix=f"{path.name}.old-", dir=path.parent))
    os.replace(path, trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)


def cleanup_incomplete(run_dir: str | Path) -> None:
    """Remove leftovers of interrupted writes (``*.tmp-*`` / ``*.old-*``) under ``run_dir/checkpoints``."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if ".tmp-" in p.name or ".old-" in p.name:
                shutil.rmtree(p, ignore_errors=True)


def checkpoint_dir(run_dir: str | Path, step: int, kind: str = "step") -> Path:
    return Path(run_dir) / CHECKPOINTS / f"{kind}_{int(step):09d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, str, Path]]:
    """Complete checkpoints of a run as ``(step, kind, path)``, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / STATE_FILE).is_file():
            out.append((int(m.group(2)), m.group(1), p))
    return sorted(out, key=lambda t: (t[0], t[1] == "step"))


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The complete checkpoint with the highest step, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][2] if found else None


# -- RNG ---------------------------------------------------------------------------------------------------------------

def capture_rng_state() -> dict:
    """``{"tensors": {...}, "json": {...}}`` of the torch (CPU and CUDA), numpy and python generators."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    py = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"tensors": tensors,
            "json": {"python": [py[0], list(py[1]), py[2]],
                     "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]}}


def restore_rng_state(rng: dict) -> None:
    t, j = rng["tensors"], rng["json"]
    torch.set_rng_state(t["rng.torch"])
    cuda = sorted((k for k in t if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t[k] for k in cuda][:torch.cuda.device_count()])
    py = j["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = j["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# -- optimizer (no pickle) ---------------------------------------------------------------------------------------------

def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalar_state": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    for pid, st in meta.get("scalar_state", {}).items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


# -- save / load -------------------------------------------------------------------------------------------------------

def save_checkpoint(path: str | Path, *, sae_state: dict[str, torch.Tensor], optimizer_state: dict,
                    sparsity_state: dict, state: dict, rng_state: Optional[dict] = None,
                    write_extra: Optional[Callable[[Path], None]] = None) -> Path:
    """Write a checkpoint directory atomically (see the module docstring). ``state`` holds the JSON part (step,
    tokens, activation_scale, source, config, trainer); ``write_extra(tmp_dir)`` may add files (the folded SAE)."""
    path = Path(path)
    rng_state = rng_state or capture_rng_state()
    with atomic_directory(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in sae_state.items()},
                  str(tmp / "sae_weights.safetensors"))
        opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        extra = {f"sparsity.{k}": v.cpu().contiguous() for k, v in sparsity_state["tensors"].items()}
        extra.update({k: v.cpu().contiguous() for k, v in rng_state["tensors"].items()})
        save_file(extra, str(tmp / "training_state.safetensors"))
        if write_extra is not None:
            write_extra(tmp)
        payload = {"format": FORMAT, "version": 1, "folded": False, **state,
                   "sparsity": sparsity_state["scalars"], "rng": rng_state["json"], "optimizer": opt_meta}
        (tmp / STATE_FILE).write_text(json.dumps(payload, indent=1))
    return path


def load_checkpoint(path: str | Path) -> TrainingCheckpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (safetensors + JSON; nothing is unpickled)."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not a complete training checkpoint (no {STATE_FILE}).")
    try:
        state = json.loads(state_file.read_text())
        sae_state = load_file(str(path / "sae_weights.safetensors"))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        extra = load_file(str(path / "training_state.safetensors"))
    except (OSError, ValueError, SafetensorError) as e:
        raise CheckpointError(f"Checkpoint {path} is unreadable ({e}); resume from an earlier one by deleting "
                              f"it.") from None
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} (format={state.get('format')!r}).")
    if state.get("folded"):
        raise CheckpointError(f"{path} holds folded weights; a training checkpoint must keep the training scale.")
    sparsity = {"tensors": {k[len("sparsity."):]: v for k, v in extra.items() if k.startswith("sparsity.")},
                "scalars": state["sparsity"]}
    rng = {"tensors": {k: v for k, v in extra.items() if k.startswith("rng.")}, "json": state["rng"]}
    return TrainingCheckpoint(path=path, state=state, sae_state=sae_state,
                              optimizer_state=_unflatten_optimizer(opt_tensors, state["optimizer"]),
                              sparsity_state=sparsity, rng_state=rng)
