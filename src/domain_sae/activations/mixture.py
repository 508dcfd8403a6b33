"""A mixture of activation sources: every batch is one batch from each part, concatenated.

With parts that serve ``b_1, ..., b_n`` rows per batch, each batch holds exactly ``b_i / sum(b)`` of part ``i``, at
every step, not only on average (the study's "general" distribution: equal shares of every domain).
"""

from __future__ import annotations

import torch

from .source import ActivationSource


class MixtureSource:
    """Batches ``cat(next(p) for p in parts)``; an :class:`~.source.ActivationSource` over parts that are."""

    def __init__(self, *parts: ActivationSource):
        if len(parts) < 1:
            raise ValueError("MixtureSource needs at least one part.")
        self.parts = list(parts)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        return torch.cat([next(p) for p in self.parts])

    next_batch = __next__

    def first_buffer(self) -> torch.Tensor:
        return torch.cat([p.first_buffer() for p in self.parts])

    def state_dict(self) -> dict:
        return {"parts": [p.state_dict() for p in self.parts]}

    def load_state_dict(self, state: dict) -> None:
        if len(state.get("parts", ())) != len(self.parts):
            raise ValueError(f"Mixture state holds {len(state.get('parts', ()))} parts; this mixture has "
                             f"{len(self.parts)}.")
        for p, st in zip(self.parts, state["parts"]):
            p.load_state_dict(st)


def split_evenly(total: int, n: int) -> list[int]:
    """``total`` split into ``n`` integer shares that differ by at most one (larger shares first)."""
    return [total // n + (1 if i < total % n else 0) for i in range(n)]
