"""Sparse kernels for SAEs whose latents are mostly zero, beside a plain dense reference for tests.

Latents f [B, d_sae] with nnz non-zeros are held in coordinate form (:class:`SparseLatents`):
f[rows_j, cols_j] = vals_j, rows ascending, ``offsets[t]`` = index of token t's first entry. Two autograd
functions then replace the dense products of an SAE step:

- :class:`SparseDecode`: y = f W_dec, y_t = sum_{j : rows_j = t} vals_j W_dec[cols_j]
  (``embedding_bag`` with per-sample weights). Backward: dL/dvals_j = <g_{rows_j}, W_dec[cols_j]> and
  dL/dW_dec[c] = sum_{j : cols_j = c} vals_j g_{rows_j}; O(nnz d_in) instead of O(B d_sae d_in).
- :class:`GatherPreActivations`: vals_j = z[rows_j, cols_j] with z = x W_enc + b_enc computed densely (the
  encoder forward, which selection needs anyway). Backward only where f is non-zero:
  dL/dW_enc[:, c] = sum_{j : cols_j = c} gv_j x_{rows_j}, dL/db_enc[c] = sum_{j : cols_j = c} gv_j and
  dL/dx_t = sum_{j : rows_j = t} gv_j W_enc[:, cols_j].

The weight gradients are "scatter outer products" out[cols_j] += w_j M[rows_j]; ``SCATTER_METHOD`` picks
``sparse_mm`` (a COO sparse x dense matmul, S^T M) or ``index_add`` (chunked gathers + index_add_); both are exact.
Everything is computed in the weights' dtype (the fp32 master weights under bf16 autocast).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

#: how weight gradients are accumulated: "sparse_mm" or "index_add" (see the module docstring).
SCATTER_METHOD = "sparse_mm"
#: entries per chunk of the gather-based products (bounds the [chunk, d] temporaries).
CHUNK = 1 << 15


@dataclass
class SparseLatents:
    """f [n_tokens, d_sae] as coordinates: f[rows_j, cols_j] = vals_j (rows ascending; ``offsets`` [n_tokens])."""

    rows: torch.Tensor
    cols: torch.Tensor
    vals: torch.Tensor
    offsets: torch.Tensor
    n_tokens: int
    d_sae: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_tokens, self.d_sae)

    def with_vals(self, vals: torch.Tensor) -> "SparseLatents":
        return SparseLatents(self.rows, self.cols, vals, self.offsets, self.n_tokens, self.d_sae)

    def to_dense(self) -> torch.Tensor:
        """The dense f [n_tokens, d_sae] (differentiable in ``vals``)."""
        out = self.vals.new_zeros(self.n_tokens, self.d_sae)
        return out.index_put((self.rows, self.cols), self.vals, accumulate=True)

    def fired_counts(self) -> torch.Tensor:
        """#{t : f_t,i > 0} per latent, long [d_sae]."""
        fired = (self.vals.detach() > 0).to(torch.long)
        return torch.zeros(self.d_sae, dtype=torch.long, device=self.cols.device).index_add_(0, self.cols, fired)

    def select(self, keep: torch.Tensor) -> "SparseLatents":
        """The entries where ``keep`` [nnz] is True (rows stay sorted)."""
        rows = self.rows[keep]
        return SparseLatents(rows, self.cols[keep], self.vals[keep], _offsets(rows, self.n_tokens), self.n_tokens,
                             self.d_sae)


def _offsets(rows: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Start of each token's entries (rows sorted); index_add_ rather than bincount: no device sync."""
    counts = torch.zeros(n_tokens, dtype=torch.long, device=rows.device).index_add_(0, rows, torch.ones_like(rows))
    return torch.cumsum(counts, 0) - counts


def from_topk(indices: torch.Tensor, values: torch.Tensor, d_sae: int) -> SparseLatents:
    """Per-token top-k: ``indices``/``values`` [B, k] -> coordinates (k entries per token)."""
    b, k = indices.shape
    rows = torch.arange(b, device=indices.device).repeat_interleave(k)
    offsets = torch.arange(b, device=indices.device) * k
    return SparseLatents(rows, indices.reshape(-1), values.reshape(-1), offsets, b, d_sae)


def from_flat_indices(flat: torch.Tensor, n_tokens: int, d_sae: int, values: Optional[torch.Tensor] = None,
                      ) -> SparseLatents:
    """Positions ``flat`` = t * d_sae + i (any order) -> coordinates sorted by token."""
    flat, order = torch.sort(flat)
    rows, cols = flat // d_sae, flat % d_sae
    vals = values[order] if values is not None else torch.zeros(0)
    return SparseLatents(rows, cols, vals, _offsets(rows, n_tokens), n_tokens, d_sae)


def from_positive(z: torch.Tensor) -> SparseLatents:
    """The positions where ``z`` [B, d_sae] > 0 (values left empty: fill with :class:`GatherPreActivations`)."""
    rows, cols = (z > 0).nonzero(as_tuple=True)
    return SparseLatents(rows, cols, z.new_zeros(0), _offsets(rows, z.shape[0]), z.shape[0], z.shape[1])


# ---------------------------------------------------------------------------------------------------------------
# primitive products

def gather_dot(rows: torch.Tensor, cols: torch.Tensor, A: torch.Tensor, W: torch.Tensor,
               offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out_j = <A[rows_j], W[cols_j]> for A [B, d], W [n, d] (rows ascending). Returns [nnz].

    With ``offsets`` it is a sampled dense-dense product (``torch.sparse.sampled_addmm`` on the CSR pattern of the
    entries: (A W^T) evaluated at the nnz positions only); otherwise chunked gathers."""
    if offsets is not None and rows.numel() > 0:
        crow = torch.cat([offsets, offsets.new_tensor([rows.shape[0]])])
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore")
            pattern = torch.sparse_csr_tensor(crow, cols, A.new_zeros(rows.shape[0]), (A.shape[0], W.shape[0]),
                                              check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, A, W.t(), beta=0.0).values()
    out = A.new_empty(rows.shape[0])
    for s in range(0, rows.shape[0], CHUNK):
        r, c = rows[s:s + CHUNK], cols[s:s + CHUNK]
        out[s:s + CHUNK] = (A.index_select(0, r) * W.index_select(0, c)).sum(-1)
    return out


def scatter_outer(cols: torch.Tensor, rows: torch.Tensor, w: torch.Tensor, M: torch.Tensor, n_out: int,
                  method: Optional[str] = None) -> torch.Tensor:
    """out [n_out, d] with out[c] = sum_{j : cols_j = c} w_j M[rows_j] (M [B, d])."""
    method = method or SCATTER_METHOD
    if method == "sparse_mm":
        S = torch.sparse_coo_tensor(torch.stack([cols, rows]), w, (n_out, M.shape[0]), check_invariants=False)
        return torch.sparse.mm(S, M)
    if method != "index_add":
        raise ValueError(f"Unknown scatter method {method!r}; use sparse_mm or index_add.")
    out = M.new_zeros(n_out, M.shape[1])
    for s in range(0, rows.shape[0], CHUNK):
        out.index_add_(0, cols[s:s + CHUNK], M.index_select(0, rows[s:s + CHUNK]) * w[s:s + CHUNK, None])
    return out


def bag_sum(cols: torch.Tensor, offsets: torch.Tensor, w: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """y [B, d] with y_t = sum_{j in bag t} w_j W[cols_j] (``embedding_bag``, mode sum)."""
    if cols.numel() == 0:
        return W.new_zeros(offsets.shape[0], W.shape[1])
    return F.embedding_bag(cols, W, offsets, mode="sum", per_sample_weights=w)


# ---------------------------------------------------------------------------------------------------------------
# autograd functions

class SparseDecode(torch.autograd.Function):
    """y = f W_dec for coordinate-form f (no bias). See the module docstring for the backward."""

    @staticmethod
    def forward(ctx, vals, rows, cols, offsets, W_dec):
        v = vals.to(W_dec.dtype)
        ctx.save_for_backward(v, rows, cols, offsets, W_dec)
        return bag_sum(cols, offsets, v, W_dec)

    @staticmethod
    def backward(ctx, g):
        v, rows, cols, offsets, W_dec = ctx.saved_tensors
        g = g.to(W_dec.dtype).contiguous()
        grad_v = gather_dot(rows, cols, g, W_dec, offsets) if ctx.needs_input_grad[0] else None
        grad_W = scatter_outer(cols, rows, v, g, W_dec.shape[0]) if ctx.needs_input_grad[4] else None
        return grad_v, None, None, None, grad_W


class GatherPreActivations(torch.autograd.Function):
    """vals_j = z[rows_j, cols_j] where z = x W_enc + b_enc was computed (without grad) by the caller; the backward
    gives dL/dx, dL/dW_enc, dL/db_enc from the nnz entries only."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, z, rows, cols, offsets):
        ctx.save_for_backward(x, W_enc, rows, cols, offsets)
        return z[rows, cols].to(W_enc.dtype)

    @staticmethod
    def backward(ctx, gv):
        x, W_enc, rows, cols, offsets = ctx.saved_tensors
        gv = gv.to(W_enc.dtype)
        d_sae = W_enc.shape[1]
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = bag_sum(cols, offsets, gv, W_enc.t().contiguous())
        if ctx.needs_input_grad[1]:
            grad_W = scatter_outer(cols, rows, gv, x.to(W_enc.dtype).contiguous(), d_sae).t()
        if ctx.needs_input_grad[2]:
            grad_b = gv.new_zeros(d_sae).index_add_(0, cols, gv)
        return grad_x, grad_W, grad_b, None, None, None, None


def sparse_decode(latents: SparseLatents, W_dec: torch.Tensor) -> torch.Tensor:
    """f W_dec [n_tokens, d_in] for coordinate-form f (differentiable in vals and W_dec)."""
    return SparseDecode.apply(latents.vals, latents.rows, latents.cols, latents.offsets, W_dec)


def gather_pre(latents: SparseLatents, x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
               z: torch.Tensor) -> torch.Tensor:
    """z[rows, cols] with gradients to x, W_enc, b_enc through the active entries only."""
    return GatherPreActivations.apply(x, W_enc, b_enc, z, latents.rows, latents.cols, latents.offsets)


# ---------------------------------------------------------------------------------------------------------------
# dense references (tests compare the kernels with these)

def reference_decode(latents: SparseLatents, W_dec: torch.Tensor) -> torch.Tensor:
    return latents.to_dense().to(W_dec.dtype) @ W_dec

