"""Streaming per-latent statistics of one SAE on one dataset (pure tensor code, bounded memory).

For latent activations ``f [n, d_sae]`` of the kept positions (``loc``: a global position index per row):

- ``n_active_i = #{f_i > 0}``, ``sum_i = sum f_i``, ``max_i = max f_i`` (float64 sums);
- ``hist[i, b]``: count of active positions with ``log10 f_i`` in bin b of ``edges`` (values outside the range are
  clipped into the end bins);
- top candidates: the ``C`` largest active values per latent with their locations (ties: earlier rows first);
- a reservoir: a uniform sample without replacement of at most ``R`` active positions per latent (priority
  sampling: every active entry draws a key u ~ U(0, 1) from a seeded generator, the R smallest keys are kept; two
  reservoirs merge by keeping the R smallest keys of their union, so per-dataset reservoirs merge exactly).
"""

from __future__ import annotations

import torch
from torch import Tensor

NEG = float("-inf")
POS = float("inf")


def hist_edges(lo: float = -6.0, hi: float = 4.0, n_bins: int = 100) -> Tensor:
    """Bin edges over log10 f (float64)."""
    return torch.linspace(lo, hi, n_bins + 1, dtype=torch.float64)


class LatentAccumulator:
    """Accumulates the statistics above; ``update(f, loc)`` per chunk, then read the attributes."""

    def __init__(self, d_sae: int, *, n_candidates: int, reservoir: int, edges: Tensor, seed: int):
        self.d = int(d_sae)
        self.n_kept = 0
        self.n_active = torch.zeros(self.d, dtype=torch.int64)
        self.sum = torch.zeros(self.d, dtype=torch.float64)
        self.max = torch.zeros(self.d, dtype=torch.float32)
        self.edges = edges
        self.lo, self.width = float(edges[0]), float(edges[1] - edges[0])
        self.n_bins = len(edges) - 1
        self.hist = torch.zeros(self.d * self.n_bins, dtype=torch.int64)
        self.top_vals = torch.full((n_candidates, self.d), NEG)
        self.top_locs = torch.full((n_candidates, self.d), -1, dtype=torch.int64)
        self.res_keys = torch.full((reservoir, self.d), POS)
        self.res_vals = torch.zeros((reservoir, self.d))
        self.res_locs = torch.full((reservoir, self.d), -1, dtype=torch.int64)
        self.gen = torch.Generator().manual_seed(int(seed))

    @staticmethod
    def bytes_per_latent(n_candidates: int, reservoir: int, n_bins: int) -> int:
        """Resident bytes per latent (for the memory prediction)."""
        return 8 + 8 + 4 + 8 * n_bins + 12 * n_candidates + 16 * reservoir

    def update(self, f: Tensor, loc: Tensor) -> None:
        """Add rows ``f [n, d]`` (float32, >= 0) at global positions ``loc [n]`` (int64)."""
        f = f.detach().to("cpu", torch.float32)
        n = f.shape[0]
        if n == 0:
            return
        self.n_kept += n
        active = f > 0
        self.n_active += active.sum(0)
        self.sum += f.sum(0, dtype=torch.float64)
        self.max = torch.maximum(self.max, f.max(0).values)
        rows, cols = torch.nonzero(active, as_tuple=True)
        if rows.numel():
            b = ((torch.log10(f[rows, cols].to(torch.float64)) - self.lo) / self.width).floor().long()
            b = b.clamp_(0, self.n_bins - 1)
            self.hist.scatter_add_(0, cols * self.n_bins + b, torch.ones_like(b))
        locs = loc.to(torch.int64)[:, None].expand(n, self.d)
        masked = torch.where(active, f, torch.full_like(f, NEG))
        vals = torch.cat([self.top_vals, masked])
        idx = torch.topk(vals, self.top_vals.shape[0], dim=0, sorted=True).indices
        self.top_vals = torch.gather(vals, 0, idx)
        self.top_locs = torch.gather(torch.cat([self.top_locs, locs]), 0, idx)
        keys = torch.rand(f.shape, generator=self.gen)
        keys = torch.where(active, keys, torch.full_like(keys, POS))
        self._merge_reservoir(keys, f, locs)

    def _merge_reservoir(self, keys: Tensor, vals: Tensor, locs: Tensor) -> None:
        k = torch.cat([self.res_keys, keys])
        idx = torch.topk(k, self.res_keys.shape[0], dim=0, largest=False, sorted=True).indices
        self.res_keys = torch.gather(k, 0, idx)
        self.res_vals = torch.gather(torch.cat([self.res_vals, vals]), 0, idx)
        self.res_locs = torch.gather(torch.cat([self.res_locs, locs]), 0, idx)

    def histogram(self) -> Tensor:
        """``[d_sae, n_bins]`` int64 counts."""
        return self.hist.view(self.d, self.n_bins)


def merged_reservoir(accs: list[LatentAccumulator], loc_offsets: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """The reservoir of the union of several accumulators' streams (locations shifted by ``loc_offsets``):
    ``(keys, vals, locs)`` each ``[R, d]``, keys ascending (inf = empty slot)."""
    keys = torch.cat([a.res_keys for a in accs])
    vals = torch.cat([a.res_vals for a in accs])
    locs = torch.cat([torch.where(a.res_locs >= 0, a.res_locs + off, a.res_locs) for a, off in zip(accs, loc_offsets)])
    r = accs[0].res_keys.shape[0]
    idx = torch.topk(keys, r, dim=0, largest=False, sorted=True).indices
    return torch.gather(keys, 0, idx), torch.gather(vals, 0, idx), torch.gather(locs, 0, idx)


def auroc_from_histograms(pos_hist: Tensor, pos_inactive: Tensor, neg_hist: Tensor, neg_inactive: Tensor) -> Tensor:
    """Per-latent AUROC = P(f_pos > f_neg) + 0.5 P(f_pos = f_neg) of telling positive tokens from negative ones by
    the activation, from binned distributions (bin 0 = inactive, exact; then the log10 bins, where two values in
    the same bin count as a tie, an error of at most half the products of the same-bin masses).
    Inputs ``[d, B]`` and ``[d]``; returns ``[d]`` float64 (0.5 when a side has no tokens)."""
    p = torch.cat([pos_inactive[:, None], pos_hist], 1).to(torch.float64)
    q = torch.cat([neg_inactive[:, None], neg_hist], 1).to(torch.float64)
    n_p, n_q = p.sum(1), q.sum(1)
    below = torch.cumsum(q, 1) - q
    score = (p * (below + 0.5 * q)).sum(1)
    denom = n_p * n_q
    return torch.where(denom > 0, score / denom.clamp_min(1), torch.full_like(score, 0.5))
