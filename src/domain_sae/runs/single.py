"""Glue between the packages: what `dsae train`, `dsae finetune` and the study call.

    train(cfg)            load model -> resolve hook -> token streams -> activation store -> SAE init -> Trainer
    resume(run_dir)       rebuild the same objects from the run's saved config and continue from its checkpoint

Run directory layout (``output_dir/run_name``)::

    training_config.json   the full TrainConfig (written first; identifies the run)
    status.json            {"state": "running" | "complete" | "interrupted" | "failed", "pid", "host", ...}
    .domain-sae.json       output marker (see outdirs.py); the rules for reusing a directory are in rundir.py
    checkpoints/           full training state (atomic), for --resume
    sae/                   the final SAE (SAELens-compatible, activation scale folded in)
    metrics.jsonl          training logs with the SPEC key names
    training_curves.png, summary.md, summary.json
"""

from __future__ import annotations

import copy
import math
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import ConfigError, TrainConfig
from ..data.splits import SPLIT_VERSION as HELDOUT_SPLIT_VERSION
from ..errors import RunDirError
from ..util.outdirs import check_not_file
from .directory import STATUS_FILE  # noqa: F401 (re-exported)
from ..training import distributed
from .directory import (CONFIG_FILE, check_run_dir, load_run_config, prepare_run_dir, process_alive, read_status,
                     remove_temporaries, running_error, write_status)


@dataclass
class TrainResult:
    run_dir: Path
    sae_dir: Path
    sae: Any
    summary: dict


# --------------------------------------------------------------------------------------------------------------------
# Run directories

def default_run_name(cfg: TrainConfig, d_in: Optional[int] = None) -> str:
    """model-hook-data-dsae, made filesystem-safe, e.g. ``smollm2-135m-instruct_blocks.0.hook_mlp_out_chat_2304``."""
    d_sae = cfg.d_sae or (cfg.expansion_factor * d_in if d_in else f"x{cfg.expansion_factor}")
    data = Path(cfg.data).stem if ("/" in cfg.data or "." in cfg.data) else cfg.data
    prefix = "ft_" if cfg.from_sae else ""
    name = f"{prefix}{Path(cfg.model).stem}_{cfg.hook}_{data}_{d_sae}"
    return re.sub(r"[^A-Za-z0-9_.\-]+", "-", name)


# --------------------------------------------------------------------------------------------------------------------
# Building blocks

def load_lm(cfg) -> Any:
    from ..models.load import load_model, resolve_device
    dtype = getattr(torch, cfg.model_dtype)
    return load_model(cfg.model, device=distributed.local_device(resolve_device(cfg.device)), dtype=dtype)


def live_activation_store(cfg: TrainConfig, lm, hook, d_in: int):
    """The activation store fed by the live model on the training split of ``cfg.data``."""
    from ..activations.live import ActivationStore
    from ..data.token_stream import TokenStream
    from ..models.hooks import capture

    device = next(lm.model.parameters()).device
    stream = TokenStream(cfg, lm.tokenizer, split="train", repeat=True)
    d = distributed.info()
    if d.active:  # rank r reads sequences r, r + W, ... and fills its share of every global batch
        stream = distributed.ShardedStream(stream, d.rank, d.world_size)

    def activation_fn(input_ids: torch.Tensor) -> torch.Tensor:
        return capture(lm.model, hook, input_ids.to(device)).float()

    return ActivationStore(activation_fn, stream, d_in=d_in, batch_size=cfg.train_batch_size_tokens // d.world_size,
                           buffer_tokens=cfg.buffer_size_tokens // d.world_size, model_batch_size=cfg.model_batch_size,
                           exclude_special=cfg.exclude_special_tokens, seed=cfg.seed, device="cpu")


def heldout_evaluator(cfg: TrainConfig, lm, hook):
    """Evaluator on the held-out split (same code as `dsae eval`), or None when evaluation is off."""
    if cfg.eval_every <= 0:
        return None
    from ..data.token_stream import heldout_batch
    from ..evaluation.runner import make_evaluator
    sample = heldout_batch(cfg, lm.tokenizer, cfg.eval_tokens)
    return make_evaluator(lm, hook, sample.input_ids, sample.segments, exclude_special=cfg.exclude_special_tokens)


def activation_scale(sample: torch.Tensor) -> float:
    """s = sqrt(d_in) / E||x||_2 (SPEC 1, expected_average_only_in); with several ranks the mean is over the
    first buffers of all of them."""
    norms = sample.double().norm(dim=-1)
    total = distributed.all_reduce_sum(torch.stack([norms.sum(), torch.tensor(float(norms.numel()),
                                                                               dtype=torch.float64)]))
    if float(total[1]) == 0 or float(total[0]) == 0.0:
        raise ConfigError("Cannot estimate the activation scale: the first buffer is empty or all-zero.")
    return float(math.sqrt(sample.shape[-1]) / (total[0] / total[1]))


def new_sae(cfg: TrainConfig, d_in: int, metadata: dict):
    """An uninitialised SAE of ``cfg.architecture`` (class from :mod:`domain_sae.sae.registry`)."""
    from ..sae.model_config import SAEModelConfig
    from ..sae.registry import get_sae_class
    d_sae = cfg.d_sae or cfg.expansion_factor * d_in
    widths = list(cfg.matryoshka_widths) or ([d_sae // 8, d_sae // 4, d_sae // 2, d_sae]
                                             if cfg.architecture == "matryoshka" else [])
    mcfg = SAEModelConfig(architecture=cfg.architecture, d_in=d_in, d_sae=d_sae, dtype=cfg.dtype,
                          apply_b_dec_to_input=cfg.apply_b_dec_to_input,
                          normalize_activations=cfg.normalize_activations,
                          mse_loss_normalization=cfg.mse_loss_normalization, lp_norm=cfg.lp_norm,
                          scale_sparsity_penalty_by_decoder_norm=cfg.scale_sparsity_penalty_by_decoder_norm,
                          normalize_sae_decoder=cfg.normalize_sae_decoder, k=cfg.k,
                          aux_k_coefficient=cfg.aux_k_coefficient, aux_k=cfg.aux_k,
                          topk_threshold_lr=cfg.topk_threshold_lr, jumprelu_bandwidth=cfg.jumprelu_bandwidth,
                          jumprelu_init_threshold=cfg.jumprelu_init_threshold,
                          jumprelu_sparsity_loss=cfg.jumprelu_sparsity_loss,
                          jumprelu_tanh_scale=cfg.jumprelu_tanh_scale, matryoshka_widths=widths, metadata=metadata)
    return get_sae_class(cfg.architecture)(mcfg)


def sae_metadata(cfg: TrainConfig, lm_name: str) -> dict:
    return {"model_name": lm_name, "hook_name": cfg.hook, "context_size": cfg.context_size,
            "prepend_bos": cfg.prepend_bos, "dataset_path": cfg.data, "training_tokens": cfg.training_tokens,
            "exclude_special_tokens": cfg.exclude_special_tokens, "holdout_fraction": cfg.holdout_fraction,
            "max_rows": cfg.max_rows, "seed": cfg.seed, "deduplicate": cfg.deduplicate,
            "heldout_split": HELDOUT_SPLIT_VERSION,
            **({"activation_cache": str(cfg.activations)} if getattr(cfg, "activations", None) else {})}


# --------------------------------------------------------------------------------------------------------------------
# Entry points

def train(cfg: TrainConfig, *, lm=None, source=None, heldout=None, init_sae=None,
          run_dir: Optional[Path] = None, evaluator=None, quiet: bool = False) -> TrainResult:
    """Train (or fine-tune, with ``init_sae``) an SAE as described by ``cfg``.

    ``source`` replaces the live activation store (e.g. a CachedActivationSource): the model is then only needed
    for evaluation. ``heldout`` = (input_ids, segments) overrides the held-out batch used by the evaluator.
    """
    cfg.validate()
    from ..models.hooks import hook_d_in, resolve_hook
    main = _init_distributed(cfg).is_main

    # Output locations are checked before the model loads (a bad --output-dir / --run-name fails in a second).
    if not main:
        pass  # rank 0 checks and prepares the run directory
    elif run_dir is not None or cfg.run_name:
        check_run_dir(Path(run_dir) if run_dir else Path(cfg.output_dir) / cfg.run_name, cfg)
    else:
        check_not_file(cfg.output_dir, "--output-dir")
    lm = lm or load_lm(cfg)
    hook = resolve_hook(lm.model, cfg.hook)
    d_in = hook_d_in(lm.model, hook)
    if source is None and not cfg.activations:
        from ..data.token_stream import check_context_size
        check_context_size(cfg, lm.model)
    run_dir = Path(run_dir) if run_dir else Path(cfg.output_dir) / (cfg.run_name or default_run_name(cfg, d_in))
    if init_sae is not None:
        from ..sae.standard import check_compatible
        check_compatible(init_sae, d_in=d_in, hook_name=cfg.hook)

    # Everything that can fail on bad input (data source, columns, empty split, scale estimate) runs before the
    # run directory exists, so a bad invocation leaves nothing behind.
    parts = _prepare(cfg, lm, hook, d_in, source, heldout, init_sae, evaluator, resuming=False)
    if not main:  # the other ranks of a torchrun job train in lock step and write nothing
        trainer = _make_trainer(run_dir, cfg, *parts, quiet=True)
        return TrainResult(run_dir=run_dir, sae_dir=run_dir / "sae", sae=None, summary=trainer.train())
    fresh = prepare_run_dir(run_dir, cfg) != "restart"  # a restarted directory may hold files of the user's
    try:
        trainer = _make_trainer(run_dir, cfg, *parts, quiet=quiet)
        if init_sae is not None and cfg.keep_optimizer:
            _load_parent_optimizer(trainer, cfg.from_sae)
        summary = trainer.train()
    except KeyboardInterrupt:
        write_status(run_dir, "interrupted")
        raise
    except BaseException as e:
        _fail(run_dir, e, remove=fresh)
        raise
    remove_temporaries(run_dir)
    write_status(run_dir, "complete")
    return TrainResult(run_dir=run_dir, sae_dir=run_dir / "sae", sae=trainer.final_sae(), summary=summary)


def _init_distributed(cfg):
    """Join the torchrun process group (no-op for one process); batch and buffer are split evenly over ranks."""
    d = distributed.init_from_env()
    for name in ("train_batch_size_tokens", "buffer_size_tokens"):
        if getattr(cfg, name) % d.world_size:
            raise ConfigError(f"{name} ({getattr(cfg, name)}) must be divisible by the number of processes "
                              f"({d.world_size}): each rank takes an equal share of every batch.")
    return d


def _load_parent_optimizer(trainer, source: Optional[str]) -> None:
    """``keep_optimizer``: reuse the Adam moments of the parent's final checkpoint (our runs only). The moments were
    accumulated at the parent's activation scale; with a different scale on the new domain they are approximate."""
    from ..training.checkpoint import latest_checkpoint, load_checkpoint
    parent = Path(source or "")
    run_dir = parent.parent if parent.name == "sae" else parent
    ckpt = latest_checkpoint(run_dir) if (run_dir / CONFIG_FILE).is_file() else None
    if ckpt is None:
        raise RunDirError(f"--keep-optimizer needs the parent's optimizer state, but {source} is not the sae/ folder "
                          f"of a domain-sae run with checkpoints (SAELens directories carry no optimizer state). "
                          f"Drop --keep-optimizer to start with a fresh Adam.")
    trainer.optimizer.load_state_dict(load_checkpoint(ckpt).optimizer_state)


def _fail(run_dir: Path, e: BaseException, *, remove: bool = True) -> None:
    """A run that failed before its first checkpoint is removed when this call created its directory (nothing to
    resume); otherwise it is marked failed (a rerun of the same command restarts it)."""
    from ..training.checkpoint import latest_checkpoint
    if remove and latest_checkpoint(run_dir) is None:
        shutil.rmtree(run_dir, ignore_errors=True)
    else:
        write_status(run_dir, "failed", error=f"{type(e).__name__}: {e}")


def _prepare(cfg, lm, hook, d_in, source, heldout, init_sae, evaluator, *, resuming: bool):
    """Source, evaluator, SAE (initialised unless resuming) and activation scale s."""
    from ..sae.init import initialize

    if source is None and cfg.activations:
        from ..activations.cache_source import open_training_cache
        d = distributed.info()
        source = open_training_cache(cfg, model_name=lm.name, d_in=d_in, shard=(d.rank, d.world_size))
    source = source if source is not None else live_activation_store(cfg, lm, hook, d_in)
    if evaluator is None and distributed.info().is_main:
        if heldout is not None and cfg.eval_every > 0:
            from ..evaluation.runner import make_evaluator
            evaluator = make_evaluator(lm, hook, *heldout, exclude_special=cfg.exclude_special_tokens)
        else:
            evaluator = heldout_evaluator(cfg, lm, hook)

    meta = sae_metadata(cfg, lm.name)
    if init_sae is not None:
        sae = copy.deepcopy(init_sae)
        parent = dict(sae.cfg.metadata)
        before = _total_tokens(parent)
        meta["lineage"] = {"parent": parent.get("source_path") or parent.get("dataset_path"),
                           "parent_dataset": parent.get("dataset_path"),
                           "parent_model": parent.get("model_name"),
                           "tokens_before": before, "tokens_after": before + cfg.training_tokens}
        sae.cfg.metadata = {**parent, **meta}
    else:
        sae = new_sae(cfg, d_in, meta)

    scale = 1.0
    if not resuming:
        sample = None
        if cfg.normalize_activations == "expected_average_only_in" or (
                init_sae is None and cfg.b_dec_init_method != "zeros"):
            sample = source.first_buffer()
        if cfg.normalize_activations == "expected_average_only_in":
            scale = activation_scale(sample)
            if init_sae is not None:
                # The parent takes raw x; unfold it so that it takes x' = s x (the same function), then train on x'.
                sae.fold_activation_scale(1.0 / scale)
            sae.cfg.normalize_activations = "expected_average_only_in"
        if init_sae is None:
            gen = torch.Generator().manual_seed(cfg.seed)
            initialize(sae, cfg, None if sample is None else sample * scale, gen)
    return sae, source, evaluator, scale


def _make_trainer(run_dir, cfg, sae, source, evaluator, scale, *, quiet: bool = False):
    from ..training.loggers import default_loggers
    from ..training.trainer import Trainer
    # the other ranks of a torchrun job log nothing (no metrics file, console line or W&B run of their own)
    loggers = default_loggers(run_dir, cfg, console=False if quiet else None) if distributed.info().is_main else []
    return Trainer(sae, cfg, source, run_dir, loggers, evaluator=evaluator, activation_scale=scale,
                   verbose=not quiet)


def _total_tokens(meta: dict) -> int:
    lineage = meta.get("lineage") or {}
    if lineage.get("tokens_after") is not None:
        return int(lineage["tokens_after"])
    return int(meta.get("training_tokens") or 0)


def resume(run_dir: Path, *, lm=None, source=None, evaluator=None) -> TrainResult:
    """Continue a killed or interrupted run from its latest checkpoint (exact: same batches, same RNG)."""
    from ..models.hooks import hook_d_in, resolve_hook
    from ..training.checkpoint import latest_checkpoint

    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise RunDirError(f"{run_dir} is a file, not a run directory; pass the run's directory to --resume.")
    cfg = load_run_config(run_dir)
    main = _init_distributed(cfg).is_main
    status = read_status(run_dir)
    if status.get("state") == "complete":
        raise RunDirError(f"Run {run_dir} is already complete; nothing to resume (its SAE is in {run_dir / 'sae'}).")
    alive = process_alive(status)
    if alive is not False:
        raise running_error(run_dir, status, alive)
    ckpt = latest_checkpoint(run_dir)
    distributed.barrier()  # every rank has read the status and the checkpoint before rank 0 writes
    if ckpt is None:  # stopped before its first checkpoint: nothing to continue, so it simply starts again
        print(f"Run {run_dir} stopped before its first checkpoint; starting it again from step 0 with its saved "
              f"options.", file=sys.stderr, flush=True)
        cfg.overwrite = False
        again = finetune if cfg.from_sae else train
        return again(cfg, lm=lm, source=source, evaluator=evaluator, run_dir=run_dir)
    if main:
        remove_temporaries(run_dir)
    lm = lm or load_lm(cfg)
    hook = resolve_hook(lm.model, cfg.hook)
    d_in = hook_d_in(lm.model, hook)
    init_sae = None
    if cfg.from_sae:
        from ..sae.io import load_sae
        init_sae = load_sae(cfg.from_sae)
    parts = _prepare(cfg, lm, hook, d_in, source, None, init_sae, evaluator, resuming=True)
    if not main:
        trainer = _make_trainer(run_dir, cfg, *parts, quiet=True)
        trainer.load_checkpoint(ckpt)
        return TrainResult(run_dir=run_dir, sae_dir=run_dir / "sae", sae=None, summary=trainer.train())
    write_status(run_dir, "running")
    try:
        trainer = _make_trainer(run_dir, cfg, *parts)
        trainer.load_checkpoint(ckpt)
        summary = trainer.train()
    except KeyboardInterrupt:
        write_status(run_dir, "interrupted")
        raise
    except BaseException as e:
        write_status(run_dir, "failed", error=f"{type(e).__name__}: {e}")
        raise
    remove_temporaries(run_dir)
    write_status(run_dir, "complete")
    return TrainResult(run_dir=run_dir, sae_dir=run_dir / "sae", sae=trainer.final_sae(), summary=summary)


def finetune(cfg: TrainConfig, **kwargs) -> TrainResult:
    """Continue training the SAE named by ``cfg.from_sae`` on ``cfg.data`` with its own budget and schedule."""
    if not cfg.from_sae:
        raise ConfigError("dsae finetune needs --from SOURCE (an SAE directory, a SAELens directory, or a SAELens "
                          "release/sae_id).")
    from ..sae.io import load_sae
    check_sae_source(cfg.from_sae)
    parent = load_sae(cfg.from_sae)
    parent.cfg.metadata = {**(parent.cfg.metadata or {}), "source_path": cfg.from_sae}
    return train(cfg, init_sae=parent, **kwargs)


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

