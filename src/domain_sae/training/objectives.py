"""What one optimizer step minimises (the ``objective`` option), and the token batches the end-to-end ones read.

With x' = s x the SAE's input at training scale (SPEC 1) and the SAE's own loss split into its reconstruction
part R and its sparsity part S,

    L_sae = R + S;   R = mse (+ the matryoshka prefix mse terms);   S = lambda_t * l1 (+ AuxK)

the objectives are

    mse      L = L_sae(x')                                     on shuffled activation batches [B, d_in]
    kl       L = KL + S                                        on whole token sequences [n, T]
    kl+mse   L = KL + w * R + S                                w = ``kl_mse_weight``

    KL = (1/M) sum over the M counted positions t of the batch of KL(p_clean,t || p_SAE,t)

where p_SAE is the next-token distribution of the frozen model with the SAE's reconstruction spliced in at its
hook. The model side of KL lives in :mod:`domain_sae.runs.kl_objective` (it needs the evaluation's positions and
its one KL definition); this module holds what the trainer calls: :class:`ActivationObjective` (mse, the
default), :func:`objective_total` (the formula above from a KL value and the SAE's :class:`LossOutput`) and
:class:`TokenBatchSource` (token batches with an exact resume).

An objective's :meth:`step` computes the loss of one batch AND its gradients (``backward``) into the SAE's
``.grad``, so that an objective may accumulate over model micro-batches; it returns ``(x', out)`` for the logs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol

import torch

from ..activations.live import SkippableStream, StoreStateError, kept_activations, read_sequences
from ..sae.base import LossOutput
from . import fastpath

__all__ = ["Objective", "ActivationObjective", "objective_total", "reconstruction_term", "TokenBatchSource"]


class Objective(Protocol):
    def step(self, trainer: Any, batch: Any, l1: float, dead_mask: Optional[torch.Tensor],
             n_dead: Optional[int]) -> tuple[torch.Tensor, LossOutput]:
        """Loss of ``batch`` and its gradients into the SAE (``trainer.sae``); returns (x' [N, d_in], out)."""
        ...

    def batch_tokens(self, batch: Any) -> int:
        """The training tokens one batch counts for (``details/n_training_tokens``)."""
        ...


class ActivationObjective:
    """objective mse: ``batch`` = activations [B, d_in]; L = L_sae(s x) (the architecture's own loss)."""

    def step(self, trainer, batch: torch.Tensor, l1: float, dead_mask, n_dead):
        x = batch.to(trainer.device, trainer.dtype, non_blocking=True)
        if trainer.activation_scale != 1.0:
            x = x * trainer.activation_scale
        with fastpath.autocast_context(trainer.cfg, trainer.device):
            out: LossOutput = trainer.sae_loss(x, l1, dead_mask=dead_mask, n_dead=n_dead)
        out.total.backward()
        return x, out

    def batch_tokens(self, batch: torch.Tensor) -> int:
        return int(batch.shape[0])


def reconstruction_term(out: LossOutput) -> torch.Tensor:
    """R = mse + the matryoshka prefix terms (``out.terms``; empty for the other architectures)."""
    return out.mse + sum(out.terms.values(), out.mse.new_zeros(()))


def objective_total(objective: str, kl: torch.Tensor, out: LossOutput, kl_mse_weight: float) -> torch.Tensor:
    """L of the module docstring from KL and the SAE's loss terms (``out.total`` = R + S): kl -> KL + S,
    kl+mse -> KL + w R + S, mse -> ``out.total``."""
    if objective == "mse":
        return out.total
    r = reconstruction_term(out)
    w = kl_mse_weight if objective == "kl+mse" else 0.0
    return kl + (out.total - r) + w * r


def with_kl(out: LossOutput, total: torch.Tensor, kl: torch.Tensor) -> LossOutput:
    """``out`` with the objective's total and ``kl_loss`` among its logged terms (``losses/kl_loss``)."""
    return dataclasses.replace(out, total=total, terms={**out.terms, "kl_loss": kl})


class TokenBatchSource:
    """Batches of ``n_sequences`` whole sequences ``(input_ids [n, T], segments [n, T])`` of a token stream, in
    stream order (no shuffle: an end-to-end step needs the sequences themselves). A short last batch is dropped.

    State: ``{"sequences_served"}``; ``load_state_dict`` on a fresh source skips that many sequences, so a resumed
    source serves exactly the batches an uninterrupted one would. :meth:`first_buffer` gives the activations
    (``activation_fn``, training positions only) of the first batches holding at least ``buffer_tokens`` of them,
    for the activation-scale estimate; those batches are then served as usual (trained on once).
    """

    def __init__(self, token_stream: Iterable, n_sequences: int, *, activation_fn: Optional[Callable] = None,
                 buffer_tokens: int = 0, exclude_special: bool = True):
        if n_sequences <= 0:
            raise StoreStateError(f"A token batch needs at least one sequence (got {n_sequences}).")
        self.token_stream, self.n_sequences = token_stream, int(n_sequences)
        self.activation_fn, self.buffer_tokens = activation_fn, int(buffer_tokens)
        self.exclude_special = bool(exclude_special)
        self._it: Optional[Iterator] = None
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # read by first_buffer, not yet served
        self.sequences_served = 0

    def _read(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._it is None:
            self._it = iter(self.token_stream)
        got = read_sequences(self._it, self.n_sequences)
        if got is None or got[0].shape[0] < self.n_sequences:
            raise StopIteration
        return got

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self._pending.pop(0) if self._pending else self._read()
        self.sequences_served += batch[0].shape[0]
        return batch

    def first_buffer(self) -> torch.Tensor:
        """Activations [n, d_in] at the training positions of the first batches (at least ``buffer_tokens``)."""
        if self.activation_fn is None or self.sequences_served or self._pending:
            raise StoreStateError("first_buffer() needs an activation_fn and must be called before any batch is "
                                  "served.")
        rows, n = [], 0
        while n < max(1, self.buffer_tokens):
            try:
                ids, segs = self._read()
            except StopIteration:
                break
            self._pending.append((ids, segs))
            acts, _ = kept_activations(self.activation_fn, ids, segs, d_in=None, exclude_special=self.exclude_special)
            rows.append(acts.float().cpu())
            n += rows[-1].shape[0]
        if not rows:
            raise StoreStateError(f"The token stream holds fewer than one batch ({self.n_sequences} sequences); "
                                  f"nothing to train on. Use more data or a smaller train_batch_size_tokens.")
        return torch.cat(rows)

    def state_dict(self) -> dict[str, Any]:
        return {"sequences_served": int(self.sequences_served), "kind": type(self).__name__}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != type(self).__name__ or "sequences_served" not in state:
            raise StoreStateError(f"Not a token-batch state: {sorted(state)} (the checkpoint was written by a run "
                                  f"with another objective).")
        if self._it is not None or self._pending or self.sequences_served:
            raise StoreStateError("Restore a token-batch state on a fresh source, before reading any batch.")
        n = int(state["sequences_served"])
        if isinstance(self.token_stream, SkippableStream):
            self.token_stream.skip(n)
        else:
            it = self._it = iter(self.token_stream)
            for _ in range(n):
                if next(it, None) is None:
                    raise StoreStateError(f"The token stream ended before sequence {n}; it is not the data the "
                                          f"checkpoint was trained on.")
        self.sequences_served = n
