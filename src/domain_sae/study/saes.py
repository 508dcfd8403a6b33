"""Stages 2 and 4 of the study: training its SAEs from the activation caches, and the token-efficiency ladder.

Every SAE of the study is an ordinary `dsae train` run (:func:`domain_sae.runs.single.train`) whose TrainConfig is
built by :func:`train_config`: the shared options come from the StudyConfig, the schedule from
:func:`~domain_sae.study.config.study_schedule`, and the activations from the caches (never from the live model).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from ..runs import single as pipeline
from ..activations.cache import CachedActivationSource
from ..activations.mixture import MixtureSource, split_evenly
from ..config import TrainConfig
from ..evaluation.metrics import ReconstructionAccumulator
from .config import CONTROL, GENERAL, StudyConfig, finetuned_name, scratch_name, study_schedule
from .inputs import HeldoutActivations

if TYPE_CHECKING:  # circular only for type checkers: prepare imports train_config from here
    from .prepare import StudyInputs

RECON_KEYS = ("metrics/explained_variance", "metrics/mse", "metrics/cossim", "metrics/l0", "sparsity/dead_fraction",
              "metrics/relative_reconstruction_bias")
RECON_CHUNK = 4096  # activation rows per SAE forward in :func:`reconstruction`


def run_name(name: str) -> str:
    """A directory name for an SAE of the study: ``general→code`` -> ``general_to_code``."""
    return name.replace(" ", "_").replace("→", "_to_").replace("(", "").replace(")", "")


def train_config(cfg: StudyConfig, *, data: str, tokens: int, seed: int, lr: float, name: str,
                 output_dir: Path) -> TrainConfig:
    """The TrainConfig of one study SAE: ``tokens`` training tokens on ``data``; no checkpoints, no in-training
    evaluation (the study evaluates every SAE itself), schedule from :func:`study_schedule`."""
    steps = max(1, tokens // cfg.train_batch_size_tokens)
    return TrainConfig(model=cfg.model, hook=cfg.hook, device=cfg.device, data=data,
                       context_size=cfg.context_size, holdout_fraction=cfg.holdout_fraction,
                       expansion_factor=cfg.expansion_factor, d_sae=cfg.d_sae, training_tokens=tokens,
                       train_batch_size_tokens=cfg.train_batch_size_tokens,
                       buffer_size_tokens=cfg.buffer_size_tokens, lr=lr, l1_coefficient=cfg.l1_coefficient,
                       architecture=cfg.architecture, k=cfg.k,
                       seed=seed, eval_every=0, n_checkpoints=0, resume_checkpoint_minutes=0,
                       output_dir=str(output_dir), run_name=name, overwrite=True,
                       **study_schedule(steps)).validate()


def activation_source(cfg: StudyConfig, caches: dict[str, Path], domain: str, seed: int):
    """Batches of one domain's cache, or for ``general`` equal shares of every domain's cache."""
    def one(d: str, batch: int, buffer: int) -> CachedActivationSource:
        return CachedActivationSource(caches[d], batch_size=batch, buffer_tokens=buffer, seed=seed, repeat=True)

    if domain != GENERAL:
        return one(domain, cfg.train_batch_size_tokens, cfg.buffer_size_tokens)
    n = len(cfg.domains)
    batches = split_evenly(cfg.train_batch_size_tokens, n)
    buffers = split_evenly(cfg.buffer_size_tokens, n)
    return MixtureSource(*(one(d, b, max(b, buf)) for d, b, buf in zip(cfg.domains, batches, buffers)))


def train_sae(inp: "StudyInputs", name: str, domain: str, tokens: int, *, seed: Optional[int] = None,
              parent: Any = None):
    """Train one SAE of the study (fine-tuned from ``parent`` when given) on ``domain`` (or the general mixture)."""
    cfg = inp.cfg
    data = "+".join(cfg.domains.values()) if domain == GENERAL else cfg.domains[domain]
    seed = cfg.seed if seed is None else seed
    tcfg = train_config(cfg, data=data, tokens=tokens, seed=seed, lr=cfg.finetune_lr if parent else cfg.lr,
                        name=run_name(name), output_dir=inp.out / "saes")
    t = time.monotonic()
    # quiet: no per-run progress line or printed table (each run still writes summary.md in its directory)
    res = pipeline.train(tcfg, lm=inp.lm, source=activation_source(cfg, inp.caches, domain, seed),
                         init_sae=parent, quiet=True)
    inp.log(f"[study]   {name}: {tokens:,} tokens in {time.monotonic() - t:.0f} s"
            + (" (fine-tuned from general)" if parent is not None else ""))
    if not inp.keep_saes:
        shutil.rmtree(res.run_dir, ignore_errors=True)
    return res.sae.eval()


@torch.no_grad()
def reconstruction(sae, acts: HeldoutActivations) -> tuple[dict, torch.Tensor]:
    """Reconstruction metrics (SPEC 3, float64) of ``sae`` on held-out activations, and per-latent density."""
    x = acts.flat
    acc = ReconstructionAccumulator(x.shape[-1], sae.cfg.d_sae)
    for i in range(0, len(x), RECON_CHUNK):
        xb = x[i:i + RECON_CHUNK]
        x_hat, f = sae.forward_with_latents(xb)
        acc.update(xb, x_hat, f)
    return acc.compute(), acc.feature_density()


def recon_summary(m: dict) -> dict:
    """The reconstruction metrics the report shows, by short name (``metrics/mse`` -> ``mse``)."""
    return {k.split("/")[-1]: m[k] for k in RECON_KEYS if k in m}


# ----------------------------------------------------------------------------------------------------------------
# Stage 2: the main SAEs

@dataclass
class TrainedSAEs:
    """The main SAEs in report order (general, control, scratch per domain, fine-tuned per domain) and, per SAE,
    what results.json records: kind, domain, training/parent/total tokens, seed, lineage."""

    saes: dict[str, Any]
    table: dict[str, dict[str, Any]]


def train_main(inp: StudyInputs) -> TrainedSAEs:
    cfg, domains = inp.cfg, inp.domains
    n = len(domains)
    total = 2 * cfg.general_tokens + n * (cfg.scratch_tokens + cfg.finetune_tokens)
    saes: dict[str, Any] = {}
    with inp.timer("train", f"general + seed control, {n} domains from scratch, general fine-tuned to each domain "
                            f"({total:,} SAE tokens)") as rec:
        saes[GENERAL] = train_sae(inp, GENERAL, GENERAL, cfg.general_tokens)
        saes[CONTROL] = train_sae(inp, CONTROL, GENERAL, cfg.general_tokens, seed=cfg.control_seed)
        for d in domains:
            saes[scratch_name(d)] = train_sae(inp, scratch_name(d), d, cfg.scratch_tokens)
        for d in domains:
            saes[finetuned_name(d)] = train_sae(inp, finetuned_name(d), d, cfg.finetune_tokens, parent=saes[GENERAL])
        rec.tokens, rec.runs = {"sae": total}, 2 + 2 * n
    info = {GENERAL: ("general", None, cfg.general_tokens, 0, cfg.seed),
            CONTROL: ("control", None, cfg.general_tokens, 0, cfg.control_seed)}
    for d in domains:
        info[scratch_name(d)] = ("scratch", d, cfg.scratch_tokens, 0, cfg.seed)
        info[finetuned_name(d)] = ("finetuned", d, cfg.finetune_tokens, cfg.general_tokens, cfg.seed)
    table = {name: {"kind": k, "domain": d, "training_tokens": t, "parent_tokens": p, "total_tokens": t + p,
                    "seed": s, "lineage": saes[name].cfg.metadata.get("lineage")}
             for name, (k, d, t, p, s) in ((name, info[name]) for name in saes)}
    return TrainedSAEs(saes, table)


# ----------------------------------------------------------------------------------------------------------------
# Stage 4: reconstruction of every SAE, and the token-efficiency ladder

@dataclass
class BudgetResults:
    """``recon``: SAE -> held-out set -> reconstruction summary; ``curves``: domain -> {tokens, scratch, finetuned,
    finetuned_on_general} (one summary per budget); ``densities``: SAE -> set -> per-latent firing density."""

    recon: dict[str, dict[str, Any]]
    curves: dict[str, Any]
    densities: dict[str, dict[str, torch.Tensor]] = field(repr=False)


def budgets(inp: StudyInputs, trained: TrainedSAEs) -> BudgetResults:
    cfg, acts = inp.cfg, inp.heldout_acts
    recon: dict[str, dict[str, Any]] = {}
    densities: dict[str, dict[str, torch.Tensor]] = {}
    curves: dict[str, Any] = {}
    with inp.timer("budgets", f"fine-tuned vs scratch at {cfg.budgets} tokens on each domain") as rec:
        for name, sae in trained.saes.items():
            recon[name], densities[name] = {}, {}
            for s in (GENERAL, *inp.domains):
                m, densities[name][s] = reconstruction(sae, acts[s])
                recon[name][s] = recon_summary(m)
        for d in inp.domains:
            c: dict[str, Any] = {"tokens": list(cfg.budgets), "scratch": [], "finetuned": [],
                                 "finetuned_on_general": []}
            for b in cfg.budgets:
                s = train_sae(inp, f"budget {d} scratch {b}", d, b)
                f = train_sae(inp, f"budget {d} finetuned {b}", d, b, parent=trained.saes[GENERAL])
                c["scratch"].append(recon_summary(reconstruction(s, acts[d])[0]))
                c["finetuned"].append(recon_summary(reconstruction(f, acts[d])[0]))
                c["finetuned_on_general"].append(recon_summary(reconstruction(f, acts[GENERAL])[0]))
            curves[d] = c
        rec.tokens = {"sae": 2 * len(inp.domains) * sum(cfg.budgets)}
        rec.runs = 2 * len(inp.domains) * len(cfg.budgets)
    return BudgetResults(recon, curves, densities)
