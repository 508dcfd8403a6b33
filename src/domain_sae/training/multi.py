"""Several SAEs trained in lock step from one activation source (one model forward per batch for all of them).

The shared source serves ``[B, sum_h d_h]`` batches: the activations of every hook side by side (one truncated
forward per model chunk, stopped after the deepest hook). SAE ``j`` trains on its hook's columns ``batch[:,
slice_j]``; every SAE sees the same rows in the same order, makes its own optimizer step, logs to its own run
directory and writes its own checkpoints. All SAEs share the step count, so their checkpoints are written at the
same steps (the ``n_checkpoints`` evenly spaced ones and one on Ctrl-C; there is no time-based rolling checkpoint
in this mode) and a resume restarts every SAE from the latest step that all of them have saved.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any, Optional

from ..activations.live import SourceExhaustedError, StoreStateError
from ..errors import UserError
from . import checkpoint as ckpt
from .trainer import Trainer, TrainingInterrupted

__all__ = ["ColumnView", "MultiTrainer", "MultiResumeError"]


class MultiResumeError(UserError):
    """The SAEs of a multi-SAE run have no common checkpoint to resume from."""


class ColumnView:
    """The columns ``[start, stop)`` of a shared source's batches: the per-SAE source handed to a Trainer (its
    state is the shared source's, loaded once)."""

    def __init__(self, shared, start: int, stop: int):
        self.shared, self.start, self.stop = shared, int(start), int(stop)
        self._loaded: Optional[dict] = None

    def first_buffer(self):
        return self.shared.first_buffer()[:, self.start:self.stop]

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.shared)[:, self.start:self.stop]

    def state_dict(self) -> dict[str, Any]:
        return self.shared.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        loaded = getattr(self.shared, "_multi_loaded_state", None)
        if loaded is None:
            self.shared.load_state_dict(state)
            self.shared._multi_loaded_state = state
        elif loaded != state:
            raise StoreStateError("The SAEs of this multi-SAE run were checkpointed at different data positions; "
                                  "they cannot resume from one shared source.")


class MultiTrainer:
    """Train ``trainers`` (each built on a :class:`ColumnView` of ``shared``) in lock step."""

    def __init__(self, trainers: list[Trainer], shared):
        steps = {t.total_steps for t in trainers}
        if len(steps) != 1:
            raise UserError(f"The SAEs of one multi-SAE run must take the same number of steps (got {sorted(steps)});"
                            f" keep training_tokens and train_batch_size_tokens out of the per-SAE overrides.")
        self.trainers, self.shared = trainers, shared
        self.total_steps = steps.pop()
        self._interrupted = False

    def resume(self) -> int:
        """Load every SAE's checkpoint at the latest step that all of them have; returns that step."""
        found = [{s: p for s, _, p in ckpt.list_checkpoints(t.run_dir)} for t in self.trainers]
        common = set(found[0]).intersection(*found[1:]) if found else set()
        if not common:
            raise MultiResumeError("The SAEs of this multi-SAE run have no checkpoint at a common step; restart "
                                   "the run with --overwrite.")
        step = max(common)
        for t, paths in zip(self.trainers, found):
            t.load_checkpoint(paths[step])
        return step

    def _on_sigint(self, signum, frame) -> None:
        if self._interrupted:
            raise KeyboardInterrupt
        self._interrupted = True
        print("\nInterrupt: finishing the current step and writing checkpoints...", file=sys.stderr, flush=True)

    def _step(self, batch) -> None:
        for t in self.trainers:
            t0 = time.monotonic()
            view = t.source
            x, out, lr, l1 = t._train_step(batch[:, view.start:view.stop])
            t.step += 1
            t.tokens += batch.shape[0]
            if t.step % t.cfg.log_every == 0 or t.step == t.total_steps:
                t._log(x.detach(), out, lr, l1)
            t.train_seconds += time.monotonic() - t0

    def train(self) -> list[dict]:
        """Run every SAE to the common total step; returns their summaries (each also written to its run)."""
        for t in self.trainers:
            t.run_dir.mkdir(parents=True, exist_ok=True)
            if t.resumed_from is None and t.step == 0:
                ckpt.cleanup_incomplete(t.run_dir)
                t.loggers.resume(0, 0)
        old = signal.signal(signal.SIGINT, self._on_sigint) \
            if threading.current_thread() is threading.main_thread() else None
        start, step0 = time.monotonic(), self.trainers[0].step
        try:
            while self.trainers[0].step < self.total_steps:
                try:
                    batch = next(self.shared)
                except StopIteration:
                    raise SourceExhaustedError(
                        f"The activation source ran out after step {self.trainers[0].step} of {self.total_steps}; "
                        f"use more data or lower training_tokens.") from None
                self._step(batch)
                step = self.trainers[0].step
                if step in self.trainers[0]._ckpt_steps:
                    for t in self.trainers:
                        t.save_checkpoint("step")
                if self._interrupted and step < self.total_steps:
                    paths = [t.save_checkpoint("resume") for t in self.trainers]
                    raise TrainingInterrupted(f"Training interrupted after step {step}; checkpoints written "
                                              f"({', '.join(map(str, paths))}).", paths[0])
            seconds = time.monotonic() - start
            return [t._finish(seconds, t.step - step0) for t in self.trainers]
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)
            for t in self.trainers:
                t.loggers.close()
