"""Glue between the packages: what `dsae train`, `dsae finetune` and the study call. Each reads top to bottom:

    train(cfg)            check the output location -> model and hook -> parts (source, evaluator, SAE, scale,
                          objective; :mod:`.parts`) -> run directory -> Trainer inside :func:`.directory.run_status`
    finetune(cfg)         train() starting from the SAE named by ``cfg.from_sae``
    train_in_stages(cfg)  train() with pauses at given steps, where the caller decides whether to go on (the study's
                          training to the plateau); a killed run continues from its last pause
    resume(run_dir)       the same parts from the run's saved config, the Trainer continued from its checkpoint

Run directory layout (``output_dir/run_name``)::

    training_config.json   the full TrainConfig (written first; identifies the run)
    status.json            {"state": "running" | "complete" | "interrupted" | "failed", "pid", "host", ...}
    .domain-sae.json       output marker (see util/outdirs.py); the rules for reusing a directory are in directory.py
    checkpoints/           full training state (atomic), for --resume
    sae/                   the final SAE (SAELens-compatible, activation scale folded in)
    metrics.jsonl          training logs with the SPEC key names
    training_curves.png, summary.md, summary.json
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..config import ConfigError, TrainConfig, to_dict
from ..errors import RunDirError
from ..training import distributed
from ..util.outdirs import check_not_file
from .directory import (STATUS_FILE, check_run_dir, load_run_config, prepare_run_dir, process_alive, read_status,
                        remove_temporaries, run_status, running_error, write_status)
from .kl_objective import check_end_to_end
from .parts import (TrainResult, activation_scale, assemble, live_activation_store, load_lm, load_parent_optimizer,
                    new_sae, open_model, sae_metadata, training_source)

__all__ = ["train", "train_in_stages", "finetune", "resume", "TrainResult", "default_run_name", "check_sae_source",
           "load_lm", "new_sae", "live_activation_store", "training_source", "activation_scale", "sae_metadata",
           "write_status", "STATUS_FILE"]


def default_run_name(cfg: TrainConfig, d_in: Optional[int] = None) -> str:
    """model-hook-data-dsae[-objective], made filesystem-safe, e.g.
    ``smollm2-135m-instruct_blocks.0.hook_mlp_out_chat_2304`` (``ft_`` in front for a fine-tune, ``_kl`` at the end
    for an end-to-end objective)."""
    d_sae = cfg.d_sae or (cfg.expansion_factor * d_in if d_in else f"x{cfg.expansion_factor}")
    data = Path(cfg.data).stem if ("/" in cfg.data or "." in cfg.data) else cfg.data
    prefix = "ft_" if cfg.from_sae else ""
    suffix = "" if cfg.objective == "mse" else f"_{cfg.objective}"
    name = f"{prefix}{Path(cfg.model).stem}_{cfg.hook}_{data}_{d_sae}{suffix}"
    return re.sub(r"[^A-Za-z0-9_.\-]+", "-", name)


def train(cfg: TrainConfig, *, lm=None, source=None, heldout=None, init_sae=None,
          run_dir: Optional[Path] = None, evaluator=None, quiet: bool = False) -> TrainResult:
    """Train (or fine-tune, with ``init_sae``) an SAE as described by ``cfg``.

    ``source`` replaces the live activation store (e.g. a CachedActivationSource): the model is then only needed
    for evaluation. ``heldout`` = (input_ids, segments) overrides the held-out batch used by the evaluator.
    """
    cfg.validate()
    main = _init_distributed(cfg).is_main
    check_end_to_end(cfg, source=source)
    # Output locations are checked before the model loads (a bad --output-dir / --run-name fails in a second);
    # rank 0 checks and prepares the run directory.
    if main and (run_dir is not None or cfg.run_name):
        check_run_dir(Path(run_dir) if run_dir else Path(cfg.output_dir) / cfg.run_name, cfg)
    elif main:
        check_not_file(cfg.output_dir, "--output-dir")
    lm, hook, d_in = open_model(cfg, lm)
    if source is None and not cfg.activations:
        from ..data.token_stream import check_context_size
        check_context_size(cfg, lm.model)
    run_dir = Path(run_dir) if run_dir else Path(cfg.output_dir) / (cfg.run_name or default_run_name(cfg, d_in))
    if init_sae is not None:
        from ..sae.standard import check_compatible
        check_compatible(init_sae, d_in=d_in, hook_name=cfg.hook)
    # Everything that can fail on bad input (data source, columns, empty split, scale estimate) runs before the
    # run directory exists, so a bad invocation leaves nothing behind.
    parts = assemble(cfg, run_dir, lm, hook, d_in, source=source, heldout=heldout, init_sae=init_sae,
                     evaluator=evaluator)
    created = main and prepare_run_dir(run_dir, cfg) != "restart"  # a restarted directory may hold the user's files
    with run_status([run_dir] if main else [], remove_if_unstarted=created):
        trainer = parts.trainer(quiet=quiet or not main)
        if init_sae is not None and cfg.keep_optimizer:
            load_parent_optimizer(trainer, cfg.from_sae)
        summary = trainer.train()
    return parts.result(trainer, summary)


def train_in_stages(cfg: TrainConfig, stops: Sequence[int], go_on: Callable[[int, Any], bool], *, lm=None,
                    source=None, init_sae=None, quiet: bool = False) -> TrainResult:
    """Train ``cfg`` (one process) with a pause after each optimizer step of ``stops`` (increasing, the last at most
    ``cfg.total_steps``): there the SAE (``sae/``) and the full training state (checkpoint ``step_<s>``, the one
    before it removed) are written and ``go_on(s, folded SAE)`` decides whether to train on to the next stop (False:
    the run ends there, complete). The learning-rate schedule must not depend on where the run ends (constant
    after warm-up, no decay) for the pauses to be free. A run directory of the same options with a checkpoint (a
    killed run) continues from it: exactly, the same batches and random draws as an uninterrupted run; ``go_on``
    is then asked again at the checkpoint's step. Global RNG states are restored after ``go_on``, so what it
    computes cannot change the training."""
    from ..training import checkpoint as ckpt
    cfg.validate()
    if not stops or list(stops) != sorted(set(stops)) or stops[0] < 1 or stops[-1] > cfg.total_steps:
        raise ConfigError(f"train_in_stages needs increasing stops in [1, {cfg.total_steps}]; got {list(stops)}.")
    _init_distributed(cfg)
    check_end_to_end(cfg, source=source)
    run_dir = Path(cfg.output_dir) / cfg.run_name
    last = _stage_checkpoint(run_dir, cfg)
    lm, hook, d_in = open_model(cfg, lm)
    parts = assemble(cfg, run_dir, lm, hook, d_in, source=source, init_sae=init_sae, resuming=last is not None)
    if last is None:
        prepare_run_dir(run_dir, cfg)
    else:
        remove_temporaries(run_dir)
    with run_status([run_dir]):
        trainer = parts.trainer(quiet=quiet)
        more, summary = True, None
        if last is not None:
            trainer.load_checkpoint(last)
            more = trainer.step not in stops or _asked(go_on, trainer.step, trainer.final_sae(), last)
        for s in [s for s in stops if s > trainer.step] if more else []:
            trainer.total_steps = s
            summary = trainer.train()
            path = ckpt.checkpoint_dir(run_dir, s)
            for _, _, old in ckpt.list_checkpoints(run_dir)[:-1]:
                ckpt.remove_checkpoint(old)
            if not _asked(go_on, s, trainer.final_sae(), path):
                break
    if summary is None:
        summary = json.loads((run_dir / "summary.json").read_text())
    return parts.result(trainer, summary)


def _asked(go_on: Callable[[int, Any], bool], step: int, sae, checkpoint: Path) -> bool:
    """``go_on(step, sae)``, then the global RNG states of the checkpoint at ``step`` back in place."""
    from ..training import checkpoint as ckpt
    answer = bool(go_on(step, sae))
    ckpt.restore_rng_state(ckpt.load_checkpoint(checkpoint).rng_state)
    return answer


def _stage_checkpoint(run_dir: Path, cfg: TrainConfig) -> Optional[Path]:
    """The latest checkpoint of ``run_dir`` when it holds a run of the same options whose process is gone, else
    None (the run starts from step 0; a different run there is replaced only when ``cfg.overwrite``)."""
    from ..training.checkpoint import latest_checkpoint
    try:
        same = _plain(to_dict(load_run_config(run_dir))) == _plain(to_dict(cfg))  # 4 == 4.0: JSON has no types
    except (RunDirError, ConfigError, ValueError, OSError):
        return None
    if not same or process_alive(read_status(run_dir)) is not False:
        return None
    return latest_checkpoint(run_dir)


def _plain(values: dict) -> dict:
    return json.loads(json.dumps(values))


def finetune(cfg: TrainConfig, **kwargs) -> TrainResult:
    """Continue training the SAE named by ``cfg.from_sae`` on ``cfg.data`` with its own budget, schedule and
    objective (``mse``, or the end-to-end ``kl`` / ``kl+mse``: docs/finetuning.md)."""
    if not cfg.from_sae:
        raise ConfigError("dsae finetune needs --from SOURCE (an SAE directory, a SAELens directory, or a SAELens "
                          "release/sae_id).")
    from ..sae.io import load_sae
    check_sae_source(cfg.from_sae)
    parent = load_sae(cfg.from_sae)
    parent.cfg.metadata = {**(parent.cfg.metadata or {}), "source_path": cfg.from_sae}
    return train(cfg, init_sae=parent, **kwargs)


def resume(run_dir: Path, *, lm=None, source=None, evaluator=None) -> TrainResult:
    """Continue a killed or interrupted run from its latest checkpoint (exact: same batches, same RNG)."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise RunDirError(f"{run_dir} is a file, not a run directory; pass the run's directory to --resume.")
    cfg = load_run_config(run_dir)
    main = _init_distributed(cfg).is_main
    check_end_to_end(cfg, source=source)
    ckpt = _resumable_checkpoint(run_dir)
    distributed.barrier()  # every rank has read the status and the checkpoint before rank 0 writes
    if ckpt is None:  # stopped before its first checkpoint: nothing to continue, so it simply starts again
        print(f"Run {run_dir} stopped before its first checkpoint; starting it again from step 0 with its saved "
              f"options.", file=sys.stderr, flush=True)
        cfg.overwrite = False
        again = finetune if cfg.from_sae else train
        return again(cfg, lm=lm, source=source, evaluator=evaluator, run_dir=run_dir)
    if main:
        remove_temporaries(run_dir)
    lm, hook, d_in = open_model(cfg, lm)
    init_sae = None
    if cfg.from_sae:
        from ..sae.io import load_sae
        init_sae = load_sae(cfg.from_sae)
    parts = assemble(cfg, run_dir, lm, hook, d_in, source=source, init_sae=init_sae, evaluator=evaluator,
                     resuming=True)
    with run_status([run_dir] if main else []):
        trainer = parts.trainer(quiet=not main)
        trainer.load_checkpoint(ckpt)
        summary = trainer.train()
    return parts.result(trainer, summary)


def _resumable_checkpoint(run_dir: Path):
    """The latest checkpoint of a run that may be resumed (None: none yet); RunDirError when the run is complete
    or still being trained."""
    from ..training.checkpoint import latest_checkpoint
    status = read_status(run_dir)
    if status.get("state") == "complete":
        raise RunDirError(f"Run {run_dir} is already complete; nothing to resume (its SAE is in {run_dir / 'sae'}).")
    alive = process_alive(status)
    if alive is not False:
        raise running_error(run_dir, status, alive)
    return latest_checkpoint(run_dir)


def _init_distributed(cfg):
    """Join the torchrun process group (no-op for one process); batch and buffer are split evenly over ranks."""
    d = distributed.init_from_env()
    for name in ("train_batch_size_tokens", "buffer_size_tokens"):
        if getattr(cfg, name) % d.world_size:
            raise ConfigError(f"{name} ({getattr(cfg, name)}) must be divisible by the number of processes "
                              f"({d.world_size}): each rank takes an equal share of every batch.")
    return d


def check_sae_source(source: str) -> None:
    """Refuse an SAE source that was meant as a local path but does not exist, before it is taken for a SAELens
    ``RELEASE/SAE_ID``: a string that starts like a path, or whose first component exists here (``runs/typo/sae``
    when ``runs/`` exists)."""
    from ..sae.io import SAEFormatError
    s = str(source)
    if s.startswith("hf://") or Path(s).expanduser().exists():
        return
    first = Path(s).parts[0] if Path(s).parts else s
    meant_as_path = s.startswith((".", "/", "~")) or ("/" in s and Path(first).exists())
    if meant_as_path:
        existing = next((q for q in Path(s).parents if q != Path(".") and q.exists()), None)
        hint = f" ({existing} exists, but nothing below it by that name)" if existing is not None else ""
        raise SAEFormatError(f"The SAE path {s} does not exist{hint}. Check the path (an SAE directory or a run "
                             f"directory, e.g. runs/NAME/sae); a SAELens release is written RELEASE/SAE_ID.")

