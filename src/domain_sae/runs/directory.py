"""Run directories: what `dsae train` may do with ``output_dir/run_name`` and the state it records there.

    training_config.json   the full TrainConfig (identifies the run)
    status.json            {"state": "running" | "complete" | "interrupted" | "failed", "pid", "host", ...}
    .domain-sae.json       the marker of :mod:`domain_sae.util.outdirs` (kind "run")

A directory is only ever replaced when it holds a domain-sae run (and ``--overwrite`` is given); a run stopped
before its first checkpoint whose process is gone simply starts again. :func:`run_status` is the one place that
writes a training run's state: "running" on entry, then "complete", "interrupted" or "failed".
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional

from ..util.atomic import remove_leftovers
from ..util.jsonsafe import write_json
from ..config import TrainConfig, from_dict, to_dict
from ..errors import RunDirError
from ..util.outdirs import check_output_dir, write_marker

CONFIG_FILE = "training_config.json"
STATUS_FILE = "status.json"
# Options that do not change what is trained; a run directory may be reused when only these differ.
_NON_IDENTITY_OPTIONS = {"overwrite", "wandb", "wandb_project", "wandb_mode", "output_dir", "run_name",
                         "resume_checkpoint_minutes", "device"}


def _identity(cfg_dict: dict) -> dict:
    return {k: v for k, v in cfg_dict.items() if k not in _NON_IDENTITY_OPTIONS}


def read_status(run_dir: Path) -> dict:
    p = Path(run_dir) / STATUS_FILE
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except (ValueError, OSError):
        return {}


def write_status(run_dir: Path, state: str, **extra) -> None:
    """status.json = {"state", "pid", "host", ...}: the process that last wrote it, so that a run whose process
    died is not reported as running."""
    write_json(Path(run_dir) / STATUS_FILE, {"state": state, "pid": os.getpid(), "host": socket.gethostname(),
                                             **extra})


def process_alive(status: dict) -> Optional[bool]:
    """Whether the process recorded in a "running" status still runs: True/False on this host, None when it
    cannot be told (another host). A status other than "running", or without a pid (older runs), gives False."""
    pid, host = status.get("pid"), status.get("host")
    if status.get("state") != "running" or not isinstance(pid, int):
        return False
    if host != socket.gethostname():
        return None
    if pid == os.getpid():
        return False  # this process is not training there now: it is the one asking
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_error(run_dir: Path, status: dict, alive: Optional[bool]) -> RunDirError:
    where = f"process {status.get('pid')} on host {status.get('host')}"
    if alive:
        return RunDirError(f"Run {run_dir} is being trained right now by {where}. Wait for it to finish, or stop "
                           f"it (Ctrl-C writes a checkpoint) and continue with `dsae train --resume {run_dir}`.")
    return RunDirError(f"Run {run_dir} is marked running by {where}, which cannot be checked from this host. If "
                       f"that process is gone, continue with `dsae train --resume {run_dir}` (or pass --overwrite "
                       f"to start it again).")


def check_run_dir(run_dir: Path, cfg: TrainConfig) -> str:
    """What :func:`prepare_run_dir` would do with ``run_dir``, raising RunDirError/OutputDirError when it must
    refuse; creates nothing. Returns "new" (absent or empty), "replace" (a run, with --overwrite) or "restart"
    (the same run, stopped before its first checkpoint and no longer running: it simply starts again)."""
    from ..training.checkpoint import latest_checkpoint
    run_dir = Path(run_dir)
    state = check_output_dir(run_dir, "run", overwrite=cfg.overwrite, option="--output-dir/--run-name")
    if state != "ours":
        return "new"
    if cfg.overwrite:
        return "replace"
    old_cfg_path = run_dir / CONFIG_FILE
    if not old_cfg_path.is_file():
        return "restart"  # killed between writing the marker and the config: nothing was trained
    try:
        old = json.loads(old_cfg_path.read_text())
    except ValueError:
        raise RunDirError(f"Run {run_dir} has a corrupt {CONFIG_FILE}; pass --overwrite to replace the run, or "
                          f"choose another --run-name.") from None
    new = to_dict(cfg)
    if _identity(old) != _identity(new):
        diff = sorted(k for k in set(old) | set(new) if k not in _NON_IDENTITY_OPTIONS and old.get(k) != new.get(k))
        raise RunDirError(f"Output directory {run_dir} already holds a different run (options that differ: "
                          f"{', '.join(diff[:8])}). Pass --overwrite to replace that run, or choose another "
                          f"--run-name.")
    status = read_status(run_dir)
    if status.get("state") == "complete":
        raise RunDirError(f"Run {run_dir} is already complete (SAE in {run_dir / 'sae'}). Pass --overwrite to train "
                          f"it again.")
    alive = process_alive(status)
    if alive is not False:
        raise running_error(run_dir, status, alive)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return "restart"
    raise RunDirError(f"Run {run_dir} already exists and was stopped (state {status.get('state', 'unknown')}, last "
                      f"checkpoint {ckpt.name}). Continue it with `dsae train --resume {run_dir}`, or pass "
                      f"--overwrite to start it again from step 0.")


def prepare_run_dir(run_dir: Path, cfg: TrainConfig) -> str:
    """Create ``run_dir`` for a new run (see :func:`check_run_dir`: only a domain-sae run is ever replaced, and
    only with ``cfg.overwrite``), write the marker and the config (the status is :func:`run_status`'s). Returns the
    action taken ("new", "replace" or "restart")."""
    run_dir = Path(run_dir)
    action = check_run_dir(run_dir, cfg)
    if action == "replace":
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_marker(run_dir, "run")
    remove_temporaries(run_dir)
    write_json(run_dir / CONFIG_FILE, to_dict(cfg))
    return action


@contextmanager
def run_status(run_dirs: Iterable[Path], *, remove_if_unstarted: bool = False) -> Iterator[None]:
    """The state of the runs trained inside the block: "running" on entry; on success the temporaries are removed
    and the state is "complete"; Ctrl-C gives "interrupted"; any other exception "failed" (with the error), except
    that a run this call's caller just created (``remove_if_unstarted``) and that has no checkpoint yet is removed
    (nothing to resume). The exception propagates. An empty ``run_dirs`` (the other ranks of a torchrun job)
    writes nothing."""
    from ..training.checkpoint import latest_checkpoint
    run_dirs = [Path(d) for d in run_dirs]
    for d in run_dirs:
        write_status(d, "running")
    try:
        yield
    except KeyboardInterrupt:
        for d in run_dirs:
            write_status(d, "interrupted")
        raise
    except BaseException as e:
        for d in run_dirs:
            if remove_if_unstarted and latest_checkpoint(d) is None:
                shutil.rmtree(d, ignore_errors=True)
            else:
                write_status(d, "failed", error=f"{type(e).__name__}: {e}")
        raise
    for d in run_dirs:
        remove_temporaries(d)
        write_status(d, "complete")


def remove_temporaries(run_dir: Path) -> None:
    """Delete what interrupted atomic writes left in the run directory and its checkpoints/ (``*.tmp-*``,
    ``*.old-*``, e.g. ``sae.tmp-*`` from a kill during the final save, ``.status.json.tmp-*``)."""
    from ..training.checkpoint import cleanup_incomplete
    run_dir = Path(run_dir)
    remove_leftovers(run_dir)
    cleanup_incomplete(run_dir)


def load_run_config(run_dir: Path) -> TrainConfig:
    p = Path(run_dir) / CONFIG_FILE
    if not p.is_file():
        raise RunDirError(f"{run_dir} is not a domain-sae run directory (no {CONFIG_FILE}); nothing to resume.")
    return from_dict(TrainConfig, json.loads(p.read_text()), source=str(p)).validate()
