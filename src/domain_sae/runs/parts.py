"""The parts one training run is made of, built in one place and read top to bottom by train, finetune, resume and
the many-SAE run:

    open_model(cfg)           the language model, its hook point and the hook's width d_in
    assemble(cfg, ...)        -> RunParts: source (activations, or token sequences for an end-to-end objective),
                                 held-out evaluator, SAE (new and initialised, or the parent's copy), activation
                                 scale s, objective
    RunParts.trainer()        the Trainer over those parts (loggers of the run directory)
    RunParts.result(...)      the TrainResult a run returns
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..config import ConfigError, TrainConfig
from ..data.splits import SPLIT_VERSION as HELDOUT_SPLIT_VERSION
from ..errors import RunDirError
from ..training import distributed
from .directory import CONFIG_FILE

__all__ = ["TrainResult", "RunParts", "assemble", "open_model", "load_lm", "live_activation_store",
           "heldout_evaluator", "activation_scale", "new_sae", "sae_metadata", "training_source",
           "load_parent_optimizer"]


@dataclass
class TrainResult:
    run_dir: Path
    sae_dir: Path
    sae: Any
    summary: dict


def load_lm(cfg) -> Any:
    from ..models.load import load_model, resolve_device
    dtype = getattr(torch, cfg.model_dtype)
    return load_model(cfg.model, device=distributed.local_device(resolve_device(cfg.device)), dtype=dtype)


def open_model(cfg: TrainConfig, lm=None) -> tuple[Any, Any, int]:
    """(lm, hook point, d_in): ``lm`` as given or loaded from ``cfg.model``, ``cfg.hook`` resolved on it."""
    from ..models.hooks import hook_d_in, resolve_hook
    lm = lm or load_lm(cfg)
    hook = resolve_hook(lm.model, cfg.hook)
    return lm, hook, hook_d_in(lm.model, hook)


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


def training_source(cfg: TrainConfig, lm, hook, d_in: int):
    """What ``cfg`` trains on: token sequences (end-to-end objective), its activation cache, or the live store."""
    if cfg.objective != "mse":
        from .kl_objective import token_batch_source
        return token_batch_source(cfg, lm, hook)
    if cfg.activations:
        from ..activations.cache_source import open_training_cache
        d = distributed.info()
        return open_training_cache(cfg, model_name=lm.name, d_in=d_in, shard=(d.rank, d.world_size))
    return live_activation_store(cfg, lm, hook, d_in)


def heldout_evaluator(cfg: TrainConfig, lm, hook, heldout=None):
    """Evaluator on the held-out split (same code as `dsae eval`), or None when evaluation is off; ``heldout`` =
    (input_ids, segments) replaces the held-out sample."""
    if cfg.eval_every <= 0:
        return None
    from ..evaluation.runner import make_evaluator
    if heldout is None:
        from ..data.token_stream import heldout_batch
        heldout = heldout_batch(cfg, lm.tokenizer, cfg.eval_tokens)
    ids, segments = heldout
    return make_evaluator(lm, hook, ids, segments, exclude_special=cfg.exclude_special_tokens)


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
            "heldout_split": HELDOUT_SPLIT_VERSION, "objective": cfg.objective,
            **({"activation_cache": str(cfg.activations)} if getattr(cfg, "activations", None) else {})}


def _total_tokens(meta: dict) -> int:
    lineage = meta.get("lineage") or {}
    if lineage.get("tokens_after") is not None:
        return int(lineage["tokens_after"])
    return int(meta.get("training_tokens") or 0)


def _sae_for(cfg: TrainConfig, d_in: int, lm_name: str, init_sae):
    """A new SAE of ``cfg``, or a copy of ``init_sae`` (fine-tuning) with its lineage in the metadata."""
    meta = sae_metadata(cfg, lm_name)
    if init_sae is None:
        return new_sae(cfg, d_in, meta)
    sae = copy.deepcopy(init_sae)
    parent = dict(sae.cfg.metadata)
    before = _total_tokens(parent)
    meta["lineage"] = {"parent": parent.get("source_path") or parent.get("dataset_path"),
                       "parent_dataset": parent.get("dataset_path"), "parent_model": parent.get("model_name"),
                       "tokens_before": before, "tokens_after": before + cfg.training_tokens}
    sae.cfg.metadata = {**parent, **meta}
    return sae


@dataclass
class RunParts:
    """Everything one training run is made of (see the module docstring)."""

    cfg: TrainConfig
    run_dir: Path
    lm: Any
    hook: Any
    d_in: int
    sae: Any
    source: Any                        # activation batches, or token batches for an end-to-end objective
    evaluator: Optional[Callable]
    scale: float                       # s; restored from the checkpoint when resuming
    objective: Any = None              # None: the SAE's own loss (objective mse)

    def trainer(self, *, quiet: bool = False):
        from ..training.loggers import default_loggers
        from ..training.trainer import Trainer
        # the other ranks of a torchrun job log nothing (no metrics file, console line or W&B run of their own)
        main = distributed.info().is_main
        loggers = default_loggers(self.run_dir, self.cfg, console=False if quiet else None) if main else []
        return Trainer(self.sae, self.cfg, self.source, self.run_dir, loggers, evaluator=self.evaluator,
                       activation_scale=self.scale, verbose=not quiet, objective=self.objective)

    def result(self, trainer, summary: dict) -> TrainResult:
        sae = trainer.final_sae() if distributed.info().is_main else None
        return TrainResult(run_dir=self.run_dir, sae_dir=self.run_dir / "sae", sae=sae, summary=summary)


def assemble(cfg: TrainConfig, run_dir: Path, lm, hook, d_in: int, *, source=None, heldout=None, init_sae=None,
             evaluator=None, resuming: bool = False) -> RunParts:
    """The parts of a run. Unless ``resuming`` (the checkpoint then restores weights and s), the scale s is
    estimated on the source's first buffer and the SAE initialised (a new one) or unfolded to take s x (a parent)."""
    from ..sae.init import initialize
    source = source if source is not None else training_source(cfg, lm, hook, d_in)
    if evaluator is None and distributed.info().is_main:
        evaluator = heldout_evaluator(cfg, lm, hook, heldout)
    sae = _sae_for(cfg, d_in, lm.name, init_sae)
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
            initialize(sae, cfg, None if sample is None else sample * scale, torch.Generator().manual_seed(cfg.seed))
    objective = None
    if cfg.objective != "mse":
        from .kl_objective import KLObjective
        objective = KLObjective(cfg, lm, hook)
    return RunParts(cfg=cfg, run_dir=Path(run_dir), lm=lm, hook=hook, d_in=d_in, sae=sae, source=source,
                    evaluator=evaluator, scale=scale, objective=objective)


def load_parent_optimizer(trainer, source: Optional[str]) -> None:
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
