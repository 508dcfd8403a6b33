"""Many SAEs from one model pass: a `saes:` list in the `dsae train` config (overrides of the top-level options).

    train_many(cfg, saes)    one shared live activation store holding every hook's activations side by side (one
                             forward per model chunk, stopped after the deepest hook) -> one Trainer per SAE on its
                             columns, stepped in lock step (training/multi.py)
    resume_many(group_dir)   continue from the latest step every SAE has checkpointed

Layout: ``output_dir/run_name`` (default ``multi``) holds ``multi_sae.json`` (the base config and the list) and one
ordinary run directory per SAE (``name``, default ``sae0``, ``sae1``, ...), each with its own metrics, checkpoints
and final SAE.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..config import ConfigError, TrainConfig, from_dict, to_dict
from ..errors import RunDirError
from ..util.jsonsafe import write_json
from ..training import distributed
from .directory import check_run_dir, prepare_run_dir, read_status, run_status
from .kl_objective import check_end_to_end
from .parts import assemble, load_lm

# Many SAEs from one model pass (a `saes:` list in the train config)

MULTI_FILE = "multi_sae.json"
# What all SAEs of one pass share: the tokens, the batches and the step count.
_SHARED_OPTIONS = ("model", "device", "model_dtype", "data", "data_split", "data_column", "max_rows", "context_size",
                   "prepend_bos", "one_document_per_sequence", "exclude_special_tokens", "holdout_fraction",
                   "deduplicate", "streaming", "model_batch_size", "training_tokens", "train_batch_size_tokens",
                   "buffer_size_tokens", "n_checkpoints", "output_dir", "activations", "from_sae", "overwrite")


def sae_configs(cfg: TrainConfig, saes: list) -> list[TrainConfig]:
    """One TrainConfig per entry of ``saes`` (overrides of ``cfg``: hook, d_sae / expansion_factor, architecture,
    l1_coefficient, k, seed (initialisation only), lr, ...; ``name`` names its run directory)."""
    if not isinstance(saes, list) or not saes or not all(isinstance(s, dict) for s in saes):
        raise ConfigError("saes must be a non-empty list of option mappings, e.g. saes: [{hook: blocks.3.hook_"
                          "resid_post, k: 32}, {hook: blocks.6.hook_resid_post, k: 64}].")
    out, names = [], set()
    for i, over in enumerate(saes):
        over = dict(over)
        name = str(over.pop("name", f"sae{i}"))
        shared = sorted(set(over) & set(_SHARED_OPTIONS))
        if shared:
            raise ConfigError(f"saes[{i}] sets {', '.join(shared)}, which all SAEs of one pass share; set them at "
                              f"the top level of the config.")
        if name in names:
            raise ConfigError(f"Two entries of saes are named {name!r}; give each a distinct name.")
        names.add(name)
        sub = from_dict(TrainConfig, {**to_dict(cfg), **over, "run_name": name}, source=f"saes[{i}]")
        out.append(sub.validate())
    return out


def train_many(cfg: TrainConfig, saes: list, *, lm=None, quiet: bool = False, resume: bool = False) -> list:
    """Train the SAEs of ``saes`` from one model pass (see :mod:`.training.multi`) under
    ``output_dir/run_name`` (default ``multi``), one run directory each; ``resume`` continues a killed run."""
    from ..activations.live import ActivationStore
    from ..data.token_stream import TokenStream, check_context_size
    from ..models.hooks import capture_many, hook_d_in, resolve_hook
    from ..util.outdirs import prepare_output_dir
    from ..training.multi import ColumnView, MultiTrainer
    cfg.validate()
    if distributed.info().active or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("A saes: list trains in one process; run it without torchrun (or train each SAE with "
                          "its own torchrun dsae train).")
    if cfg.activations:
        raise ConfigError("A saes: list trains from the live model in one pass; drop activations (train each SAE "
                          "from the cache with its own dsae train --activations instead).")
    subs = sae_configs(cfg, saes)
    for sub in [cfg, *subs]:
        check_end_to_end(sub, many=True)
    group = Path(cfg.output_dir) / (cfg.run_name or "multi")
    if not resume:
        for sub in subs:
            check_run_dir(group / sub.run_name, sub)
    lm = lm or load_lm(cfg)
    check_context_size(cfg, lm.model)
    points = {h: resolve_hook(lm.model, h) for h in dict.fromkeys(s.hook for s in subs)}
    widths = {h: hook_d_in(lm.model, p) for h, p in points.items()}
    offsets, off = {}, 0
    for h, d in widths.items():
        offsets[h], off = off, off + d
    device = next(lm.model.parameters()).device

    def activation_fn(ids):
        got = capture_many(lm.model, list(points.values()), ids.to(device))
        return torch.cat([got[h].float() for h in points], dim=-1)

    shared = ActivationStore(activation_fn, TokenStream(cfg, lm.tokenizer, split="train", repeat=True), d_in=off,
                             batch_size=cfg.train_batch_size_tokens, buffer_tokens=cfg.buffer_size_tokens,
                             model_batch_size=cfg.model_batch_size, exclude_special=cfg.exclude_special_tokens,
                             seed=cfg.seed, device="cpu")
    if not resume:
        prepare_output_dir(group, "multi-sae-run", option="--output-dir/--run-name")
        write_json(group / MULTI_FILE, {"base": to_dict(cfg), "saes": saes})
    runs = []
    for sub in subs:
        view = ColumnView(shared, offsets[sub.hook], offsets[sub.hook] + widths[sub.hook])
        runs.append(assemble(sub, group / sub.run_name, lm, points[sub.hook], widths[sub.hook], source=view,
                             resuming=resume))
        if not resume:
            prepare_run_dir(group / sub.run_name, sub)
    with run_status([p.run_dir for p in runs]):
        trainers = [p.trainer(quiet=quiet) for p in runs]
        multi = MultiTrainer(trainers, shared)
        if resume:
            multi.resume()
        summaries = multi.train()
    return [p.result(t, s) for p, t, s in zip(runs, trainers, summaries)]


def resume_many(group: Path, *, lm=None, quiet: bool = False) -> list:
    """Continue a killed multi-SAE run from the latest step every SAE has checkpointed."""
    spec = json.loads((Path(group) / MULTI_FILE).read_text())
    runs = [Path(group) / str(s.get("name", f"sae{i}")) for i, s in enumerate(spec["saes"])]
    if all(read_status(r).get("state") == "complete" for r in runs):
        raise RunDirError(f"The multi-SAE run {group} is already complete; nothing to resume (its SAEs are in "
                          f"{', '.join(str(r / 'sae') for r in runs)}).")
    cfg = from_dict(TrainConfig, spec["base"], source=str(Path(group) / MULTI_FILE))
    return train_many(cfg, spec["saes"], lm=lm, quiet=quiet, resume=True)
