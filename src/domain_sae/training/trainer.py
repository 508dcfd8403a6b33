"""The training loop: Adam on the SAE loss over batches from an activation source.

Per optimizer step t (0-based), with s the activation scale (SPEC 1):

    L, dL/dtheta = objective.step(batch)   default (objective mse): x' = s * x;  L = sae.loss(x', lambda_t,
                   dead_mask=dead latents);  L.backward()   (under bf16 autocast on CUDA); the end-to-end
                   objectives (kl, kl+mse) are in :mod:`.objectives`
    if normalize_sae_decoder: remove the gradient component parallel to each decoder row
    clip the global gradient norm to grad_clip_norm;  lr <- lr_at(t);  Adam step
    if normalize_sae_decoder: renormalise decoder rows to unit norm
    sparsity tracker update (firing counts stay on the device)

The SAE is anything implementing :class:`domain_sae.sae.base.SAE`; the device options (TF32, autocast, fused
Adam, torch.compile) are in :mod:`.fastpath`. Host reads of device values happen only at log steps (and, on
accelerators, the dead-latent count AuxK needs is refreshed there too).

Every ``log_every`` steps (and at the last step) the SPEC 3 keys are logged; every ``eval_every`` logs the
evaluator runs on a folded copy of the SAE. Checkpoints: ``n_checkpoints`` evenly spaced ones (a usable folded
SAE + the full training state), a rolling resume checkpoint every ``resume_checkpoint_minutes``, and one on
Ctrl-C. The model is never run here: batches come from the source (an end-to-end objective runs it).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from ..activations.live import SourceExhaustedError
from ..errors import UserError
from ..util.jsonsafe import write_json
from ..evaluation.metrics import ReconstructionAccumulator
from ..util.markdown import escape_markdown
from ..sae.base import SAE
from . import checkpoint as ckpt
from . import distributed, fastpath
from .loggers import METRICS_FILE, JSONLLogger, Logger, MultiLogger
from .objectives import ActivationObjective, Objective
from .plots import last_values, plot_training_curves, summary_table
from .schedules import l1_at, lr_at
from .sparsity import SparsityTracker

__all__ = ["Trainer", "TrainingInterrupted", "TrainingDivergedError", "check_divergence", "batch_metrics",
           "checkpoint_steps"]

# Options whose change makes a resumed loss trace differ from the checkpointed run's.
_TRACE_OPTIONS = ("training_tokens", "train_batch_size_tokens", "buffer_size_tokens", "lr", "lr_scheduler_name",
                  "lr_warm_up_steps", "lr_decay_steps", "lr_end", "l1_coefficient", "l1_warm_up_steps",
                  "adam_beta1", "adam_beta2", "grad_clip_norm", "seed", "normalize_sae_decoder", "data", "model",
                  "hook", "context_size", "architecture", "k", "kernels", "autocast", "activations",
                  "objective", "kl_mse_weight")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: the current step was finished and a checkpoint written (``.checkpoint``)."""

    def __init__(self, message: str, checkpoint: Optional[Path] = None):
        super().__init__(message)
        self.checkpoint = checkpoint


def checkpoint_steps(total_steps: int, n_checkpoints: int) -> list[int]:
    """Steps after which the ``n_checkpoints`` evenly spaced intermediate checkpoints are written:
    floor(T * k / (n + 1)) for k = 1..n (the final save at T is separate)."""
    return sorted({total_steps * k // (n_checkpoints + 1) for k in range(1, n_checkpoints + 1)} - {0, total_steps})


@torch.no_grad()
def batch_metrics(x: torch.Tensor, x_hat: torch.Tensor, f: Optional[torch.Tensor], *,
                  fired_counts: Optional[torch.Tensor] = None) -> dict[str, float]:
    """Explained variance, its per-token std and L0 of one batch (SPEC 3), computed by the same float64
    :class:`~domain_sae.evaluation.metrics.ReconstructionAccumulator` that ``dsae eval`` uses:

    EV = 1 - sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean(x)||^2;
    EV_std = population std over tokens of 1 - ||x_t - x_hat_t||^2 / ||x_t - mean(x)||^2;
    L0 = mean_t #{i : f_t,i > 0} (from ``fired_counts`` [d_sae] instead of a dense ``f`` when given)."""
    d_sae = f.shape[-1] if f is not None else fired_counts.shape[0]
    acc = ReconstructionAccumulator(x.shape[-1], d_sae)
    acc.update(x, x_hat, f, fired_counts=fired_counts)
    m = acc.compute()
    return {k: m[k] for k in ("metrics/explained_variance", "metrics/explained_variance_std", "metrics/l0")}


class TrainingDivergedError(UserError):
    """The loss became non-finite (or exploded): the run is stopped before anything non-finite is saved."""


DIVERGENCE_FACTOR = 1e6  # a loss this many times the run's first loss counts as diverged (a finite blow-up)


def check_divergence(loss: torch.Tensor, reference: Optional[float], *, step: int, total_steps: int, lr: float,
                     l1: float, run_dir: Path) -> float:
    """Raise :class:`TrainingDivergedError` when ``loss`` is inf/nan or above DIVERGENCE_FACTOR x ``reference``
    (the first loss of this session); returns the reference to use for the next step."""
    value = float(loss.detach())
    if math.isfinite(value) and not (reference is not None and reference > 0
                                     and value > DIVERGENCE_FACTOR * reference):
        return value if reference is None else reference
    first = f" (the first step's loss was {reference:.4g})" if reference is not None else ""
    last = ckpt.latest_checkpoint(run_dir)
    kept = (f"the last good checkpoint, {last}, is kept; rerun with the lower values and --overwrite"
            if last is not None else "no checkpoint had been written yet; rerun with the lower values")
    raise TrainingDivergedError(
        f"Training diverged at step {step} of {total_steps}: the loss is {value:.4g}{first} at learning rate "
        f"{lr:g} and l1 coefficient {l1:g}. The likely cause is a learning rate too high for these activations: "
        f"lower --lr (e.g. 10x), add --lr-warm-up-steps, keep --grad-clip-norm above 0, or lower "
        f"--l1-coefficient. The run was stopped and no SAE was saved as final; {kept}.")


class Trainer:
    """Train ``sae`` on batches from ``source`` (an ActivationStore or CachedActivationSource).

    ``loggers``: a list of :class:`~.loggers.Logger` or a MultiLogger (default: ``run_dir/metrics.jsonl``);
    ``evaluator(sae) -> dict`` receives a folded copy (takes raw activations); ``activation_scale`` is s;
    ``objective`` (:mod:`.objectives`) computes each step's loss and gradients (default: the SAE's own loss).
    """

    def __init__(self, sae: SAE, cfg, source, run_dir: str | Path, loggers: Optional[Iterable[Logger]] = None,
                 evaluator: Optional[Callable[[Any], dict]] = None, activation_scale: float = 1.0, *,
                 verbose: bool = True, objective: Optional[Objective] = None):
        self.sae = sae
        self.cfg = cfg
        self.source = source
        self.run_dir = Path(run_dir)
        self.dist = distributed.info()  # several ranks (torchrun): gradients averaged, only rank 0 writes
        distributed.broadcast_parameters(sae)
        if not self.dist.is_main:
            loggers, evaluator = [], None
        if isinstance(loggers, MultiLogger):
            self.loggers = loggers
        else:
            self.loggers = MultiLogger(loggers if loggers is not None else [JSONLLogger(self.run_dir / METRICS_FILE)])
        self.evaluator = evaluator
        self.activation_scale = float(activation_scale)
        self.verbose = verbose
        self.device, self.dtype = sae.W_enc.device, sae.W_enc.dtype
        sae.configure_kernels(cfg.kernels, cfg.sparse_density_threshold)
        fastpath.configure_matmul_precision(cfg, self.device)
        self.optimizer = fastpath.make_optimizer(sae.parameters(), cfg, self.device)
        self.sae_loss = fastpath.loss_function(sae, cfg)
        self.objective = objective if objective is not None else ActivationObjective()
        self._sync_every = fastpath.host_sync_every(cfg, self.device)
        self._n_dead = 0  # host copy of the dead-latent count, refreshed every _sync_every steps
        self.tracker = SparsityTracker.from_config(int(sae.W_dec.shape[0]), cfg)
        self.total_steps = int(cfg.total_steps)
        self.step = 0
        self.tokens = 0
        self.n_logs = 0
        self.train_seconds = 0.0
        self.records: list[dict] = []
        self.resumed_from: Optional[Path] = None
        self._ckpt_steps = set(checkpoint_steps(self.total_steps, cfg.n_checkpoints))
        self._interrupted = False
        self._final_sae = None
        self._loss_ref: Optional[float] = None  # first loss of this session (divergence check)

    # -- one step -----------------------------------------------------------------------------------------------
    def _next_batch(self) -> torch.Tensor:
        try:
            return next(self.source)
        except StopIteration:
            raise SourceExhaustedError(
                f"The activation source ran out of data after {self.tokens} training tokens (step {self.step} of "
                f"{self.total_steps}). Use more data (or a repeating stream) or lower training_tokens.") from None

    def _train_step(self, batch):
        cfg = self.cfg
        lr, l1 = lr_at(self.step, cfg), l1_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sync = self.step % self._sync_every == 0  # host reads only on sync steps (every step on CPU)
        if sync:
            self._n_dead = int(self.tracker.dead_mask().sum())
        dead = self.tracker.dead_mask() if self._n_dead > 0 else None
        self.optimizer.zero_grad(set_to_none=True)
        x, out = self.objective.step(self, batch, l1, dead, self._n_dead if dead is not None else None)
        if sync:  # before the update: a non-finite loss never reaches the weights
            total = distributed.all_reduce_sum(out.total.detach()) / self.dist.world_size
            self._loss_ref = check_divergence(total, self._loss_ref, step=self.step + 1,
                                              total_steps=self.total_steps, lr=lr, l1=l1, run_dir=self.run_dir)
        distributed.average_gradients(self.sae.parameters())
        if cfg.normalize_sae_decoder:
            self.sae.remove_gradient_parallel_to_decoder_directions()
        if cfg.grad_clip_norm and cfg.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.sae.parameters(), cfg.grad_clip_norm)
        self.optimizer.step()
        if cfg.normalize_sae_decoder:
            self.sae.set_decoder_norm_to_unit_norm()
        self.tracker.update_counts(distributed.all_reduce_sum(out.fired_counts()), x.shape[0] * self.dist.world_size)
        return x, out, lr, l1

    def _log(self, x, out, lr: float, l1: float) -> dict:
        self.n_logs += 1
        rec = {"losses/mse_loss": float(out.mse.detach()), "losses/l1_loss": float(out.l1.detach()),
               "losses/raw_l1_loss": float(out.raw_l1.detach()), "losses/overall_loss": float(out.total.detach()),
               **batch_metrics(x, out.x_hat.detach(), None, fired_counts=out.fired_counts()),
               "details/current_learning_rate": lr, "details/current_l1_coefficient": l1,
               "details/n_training_tokens": self.tokens, **self.tracker.step_metrics(),
               **{f"losses/{k}": float(v.detach()) for k, v in out.log_terms().items()}}
        window = self.tracker.pop_window_stats()
        if window:
            rec.update(window)
        if self.evaluator is not None and self.cfg.eval_every > 0 and self.n_logs % self.cfg.eval_every == 0:
            rec.update(self.evaluator(self.folded_copy()))
        self.loggers.log(self.step, rec)
        self.records.append({"step": self.step, **rec})
        return rec

    # -- saving ---------------------------------------------------------------------------------------------------
    def folded_copy(self):
        """A copy of the SAE that takes raw activations (s folded into the weights)."""
        sae = copy.deepcopy(self.sae)
        for p in sae.parameters():
            p.grad = None
        with torch.no_grad():
            sae.fold_activation_scale(self.activation_scale)
        return sae

    def final_sae(self):
        return self._final_sae if self._final_sae is not None else self.folded_copy()

    def _config_dict(self) -> dict:
        return dataclasses.asdict(self.cfg) if dataclasses.is_dataclass(self.cfg) else dict(vars(self.cfg))

    def save_checkpoint(self, kind: str = "step", *, with_sae: Optional[bool] = None) -> Path:
        """Write the full training state atomically to ``run_dir/checkpoints/<kind>_<step>`` (with a folded SAE
        under ``sae/`` for ``kind="step"``), then drop superseded rolling checkpoints."""
        with_sae = (kind == "step") if with_sae is None else with_sae

        def write_sae(tmp: Path) -> None:
            self.folded_copy().save(tmp / "sae", sparsity=self.tracker.log10_density())

        sources = distributed.all_gather_objects(self.source.state_dict())  # every rank's data position
        state = {"step": self.step, "tokens": self.tokens, "activation_scale": self.activation_scale,
                 "total_steps": self.total_steps, "source": sources[0], "config": self._config_dict(),
                 "trainer": {"n_logs": self.n_logs, "train_seconds": self.train_seconds},
                 **({"source_ranks": sources} if self.dist.active else {})}
        if not self.dist.is_main:
            return ckpt.checkpoint_dir(self.run_dir, self.step, kind)
        path = ckpt.save_checkpoint(ckpt.checkpoint_dir(self.run_dir, self.step, kind),
                                    sae_state=self.sae.state_dict(), optimizer_state=self.optimizer.state_dict(),
                                    sparsity_state=self.tracker.state_dict(), state=state,
                                    write_extra=write_sae if with_sae else None)
        for step, k, p in ckpt.list_checkpoints(self.run_dir):
            if k == "resume" and p != path:
                ckpt.remove_checkpoint(p)
        return path

    # -- resume ---------------------------------------------------------------------------------------------------
    def load_checkpoint(self, path: str | Path) -> int:
        """Restore SAE, optimizer, step/tokens, scale, sparsity tracker, source position and RNG states from a
        checkpoint; the loggers drop records after its step. Returns the step."""
        c = ckpt.load_checkpoint(path)
        old = c.state.get("config", {})
        new = self._config_dict()
        changed = [k for k in _TRACE_OPTIONS if k in old and k in new and old[k] != new[k]]
        if changed:
            warnings.warn(f"Resuming {path} with changed options {', '.join(changed)}: the rest of the run will not "
                          f"match an uninterrupted one.", stacklevel=2)
        self.sae.load_state_dict(c.sae_state)
        self.optimizer.load_state_dict(c.optimizer_state)
        self.tracker.load_state_dict(c.sparsity_state)
        self.source.load_state_dict(distributed.rank_state(c.state, self.dist))
        ckpt.restore_rng_state(c.rng_state)
        self.step, self.tokens = int(c.state["step"]), int(c.state["tokens"])
        self.activation_scale = float(c.state["activation_scale"])
        self.n_logs = int(c.state["trainer"]["n_logs"])
        self.train_seconds = float(c.state["trainer"].get("train_seconds", 0.0))
        self.loggers.resume(self.step, self.tokens)
        self.records = [r for r in self._log_records() if r.get("step", 0) <= self.step]
        self.resumed_from = Path(path)
        if self.dist.is_main:
            ckpt.cleanup_incomplete(self.run_dir)
        return self.step

    def resume(self, run_dir: Optional[str | Path] = None) -> int:
        """Continue from the latest checkpoint of ``run_dir`` (default: this trainer's run directory)."""
        run_dir = Path(run_dir) if run_dir is not None else self.run_dir
        path = ckpt.latest_checkpoint(run_dir)
        if path is None:
            raise ckpt.CheckpointError(f"{run_dir} has no complete checkpoint to resume from.")
        return self.load_checkpoint(path)

    def _log_records(self) -> list[dict]:
        jl = self.loggers.find(JSONLLogger)
        return jl.records() if jl is not None else list(self.records)

    # -- Ctrl-C ---------------------------------------------------------------------------------------------------
    def _on_sigint(self, signum, frame) -> None:
        if self._interrupted:
            raise KeyboardInterrupt  # second Ctrl-C: stop at once, without a checkpoint
        self._interrupted = True
        print("\nInterrupt: finishing the current step and writing a checkpoint (press Ctrl-C again to abort "
              "without one)...", file=sys.stderr, flush=True)

    # -- main loop ------------------------------------------------------------------------------------------------
    def train(self) -> dict:
        """Run to ``cfg.total_steps``; returns the summary dict (also written to summary.json / summary.md)."""
        cfg = self.cfg
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.resumed_from is None and self.step == 0 and self.dist.is_main:
            ckpt.cleanup_incomplete(self.run_dir)
            self.loggers.resume(0, 0)  # fresh run: drop stale records
        old_handler = None
        if threading.current_thread() is threading.main_thread():
            old_handler = signal.signal(signal.SIGINT, self._on_sigint)
        last_resume_ckpt = time.monotonic()
        session_start, session_step0 = time.monotonic(), self.step
        try:
            while self.step < self.total_steps:
                t0 = time.monotonic()
                batch = self._next_batch()
                x, out, lr, l1 = self._train_step(batch)
                self.step += 1
                self.tokens += self.objective.batch_tokens(batch) * self.dist.world_size
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    self._log(x.detach(), out, lr, l1)
                del x, out
                self.train_seconds += time.monotonic() - t0
                if self.step in self._ckpt_steps:
                    self.save_checkpoint("step")
                    last_resume_ckpt = time.monotonic()
                elif (cfg.resume_checkpoint_minutes > 0 and self.step < self.total_steps
                      and self._agreed(time.monotonic() - last_resume_ckpt >= 60.0 * cfg.resume_checkpoint_minutes)):
                    self.save_checkpoint("resume")
                    last_resume_ckpt = time.monotonic()
                if self._agreed(self._interrupted) and self.step < self.total_steps:
                    path = self.save_checkpoint("resume")
                    msg = (f"Training interrupted after step {self.step}/{self.total_steps} ({self.tokens:,} tokens). "
                           f"Checkpoint written to {path}. Resume with: dsae train --resume {self.run_dir}")
                    print(msg, file=sys.stderr, flush=True)
                    raise TrainingInterrupted(msg, path)
            summary = self._finish(time.monotonic() - session_start, self.step - session_step0)
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
            self._interrupted = False
            self.loggers.close()
        return summary

    def _agreed(self, flag: bool) -> bool:
        """``flag`` (from a clock or a signal); with several ranks, rank 0's value, taken at log steps only."""
        if not self.dist.active:
            return flag
        return self.step % self.cfg.log_every == 0 and distributed.broadcast_flag(flag)

    def _finish(self, session_seconds: float, session_steps: int) -> dict:
        final = self.folded_copy()
        if not self.dist.is_main:  # the other ranks only take part in the final checkpoint's gather
            self._final_sae = final
            self.save_checkpoint("step", with_sae=False)
            return {"steps": self.step, "training_tokens": self.tokens, "rank": self.dist.rank}
        if not all(bool(torch.isfinite(p).all()) for p in final.parameters()):  # the last update blew up
            check_divergence(torch.tensor(float("nan")), self._loss_ref, step=self.step, total_steps=self.total_steps,
                             lr=lr_at(self.step - 1, self.cfg), l1=l1_at(self.step - 1, self.cfg),
                             run_dir=self.run_dir)
        with ckpt.atomic_directory(self.run_dir / "sae") as tmp:
            final.save(tmp, sparsity=self.tracker.log10_density())
        self._final_sae = final
        self.save_checkpoint("step", with_sae=False)  # full state at the end (e.g. keep_optimizer fine-tuning)
        records = self._log_records()
        plot_training_curves(records, self.run_dir / "training_curves.png",
                             title=f"{self.run_dir.name}: {self.tokens:,} tokens")
        density = self.tracker.density()
        tok_s = self.cfg.train_batch_size_tokens * session_steps / session_seconds if session_seconds > 0 else None
        summary = {
            "run_dir": str(self.run_dir), "sae_dir": str(self.run_dir / "sae"), "steps": self.step,
            "training_tokens": self.tokens, "activation_scale": self.activation_scale,
            "train_seconds": self.train_seconds, "tokens_per_second": tok_s,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "never_fired": int((density == 0).sum()), "d_sae": int(density.numel()),
            "metrics": {k: v for k, v in last_values(records).items() if "/" in k},
        }
        extra = {"activation scale s": self.activation_scale, "latents never fired (whole run)":
                 f"{summary['never_fired']} / {summary['d_sae']}", "steps": self.step,
                 "training time (s)": round(self.train_seconds, 1)}
        table = summary_table(records, extra)
        title = escape_markdown(self.run_dir.name)
        (self.run_dir / "summary.md").write_text(f"# Training summary: {title}\n\n{table}\n")
        write_json(self.run_dir / "summary.json", summary)
        if self.verbose:
            print(f"\nTraining finished: {self.run_dir}\n{table}", flush=True)
        return summary
