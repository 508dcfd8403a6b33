"""The TopK family (SPEC section 2): TopK, BatchTopK and Matryoshka (BatchTopK with nested prefixes).

    z = (x - a b_dec) W_enc + b_enc;   x_hat = f W_dec + b_dec;   loss = mse + aux (+ matryoshka prefix terms)

- ``topk``: f_t keeps the k largest entries of ReLU(z_t) (zero elsewhere).
- ``batchtopk``: f keeps the k * B largest entries of ReLU(z) over the whole batch of B tokens. A global threshold
  is tracked by EMA of the smallest kept activation, theta <- (1 - r) theta + r min{f > 0} (r =
  ``topk_threshold_lr``); at inference (``encode``, and in the saved file) f = ReLU(z) * 1[z > theta], written as
  SAELens ``jumprelu`` with threshold theta for every latent.
- ``matryoshka``: BatchTopK whose dictionary prefixes m_1 < ... < m_L = d_sae (``matryoshka_widths``) each
  reconstruct on their own: loss = sum_l mse(b_dec + sum_{i < m_l} f_i W_dec,i, x) + aux.
- AuxK (dead latents, all three): e = stopgrad(x - x_hat); A_t = the top k_aux = min(aux_k, #dead) pre-activations
  z_t,i among dead latents (aux_k defaults to d_in // 2); aux = alpha * 1/B sum_t ||e_t - sum_{i in A_t} z_ti
  W_dec,i||^2 (no bias; alpha = ``aux_k_coefficient``, 1/32).

``l1`` and ``raw_l1`` are 0 (the sparsity is the selection). The sparse kernels are used unless
``kernel_mode="dense"``: z is computed densely once (without autograd), the selected coordinates are gathered with
gradients through :class:`~.sparse.GatherPreActivations` and decoded with :class:`~.sparse.SparseDecode`.
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import BaseSAE, LossOutput, affine
from .sparse import SparseLatents, from_flat_indices, from_topk, gather_pre, sparse_decode


class TopKFamilySAE(BaseSAE):
    """Shared loss of the TopK family; subclasses define the selection."""

    def _select(self, z: torch.Tensor) -> SparseLatents:
        """Coordinates of the kept entries of f (values from z, no gradient), z [B, d_sae]."""
        raise NotImplementedError

    def _select_dense(self, z: torch.Tensor) -> torch.Tensor:
        """Dense f with gradients through z (the dense reference path)."""
        lat = self._select(z.detach())
        f = torch.zeros_like(z)
        return f.index_put((lat.rows, lat.cols), torch.relu(z[lat.rows, lat.cols]))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encode_pre(x)
        shape = z.shape
        return self._select_dense(z.reshape(-1, self.d_sae)).reshape(shape)

    def _after_forward(self, vals: torch.Tensor) -> None:
        """Hook for running statistics (the batchtopk threshold)."""

    def _prefix_terms(self, x2, lat: Optional[SparseLatents], f: Optional[torch.Tensor]) -> dict:
        return {}

    def loss(self, x: torch.Tensor, sparsity_coefficient: float = 0.0, *,
             dead_mask: Optional[torch.Tensor] = None, n_dead: Optional[int] = None) -> LossOutput:
        """mse + aux (see the module docstring); ``sparsity_coefficient`` is not used by this family."""
        x2 = self.flat(x)
        xc = x2 - self.b_dec if self.cfg.apply_b_dec_to_input else x2
        if self.kernel_mode != "dense":
            with torch.no_grad():
                z = affine(xc, self.W_enc, self.b_enc)
            lat = self._select(z)
            lat = lat.with_vals(torch.relu(gather_pre(lat, xc, self.W_enc, self.b_enc, z)))
            x_hat = sparse_decode(lat, self.W_dec) + self.b_dec
            latents, f, vals = lat, None, lat.vals
        else:
            z = affine(xc, self.W_enc, self.b_enc)
            f = self._select_dense(z)
            x_hat = f @ self.W_dec + self.b_dec
            latents, lat, vals = f, None, f[f > 0]
        with torch.no_grad():
            self._after_forward(vals.detach())
        mse = self.mse(x2, x_hat)
        terms = self._prefix_terms(x2, lat, f)
        aux = self.aux_loss(x2, x_hat, xc, z, dead_mask, n_dead)
        zero = mse.new_zeros(())
        x_hat, latents = self.unflat(x, x_hat, latents)
        total = mse + aux + sum(terms.values(), zero)
        return LossOutput(total=total, mse=mse, l1=zero, raw_l1=zero, latents=latents, x_hat=x_hat, aux=aux,
                          terms=terms)

    def aux_loss(self, x2, x_hat, xc, z, dead_mask: Optional[torch.Tensor], n_dead: Optional[int]) -> torch.Tensor:
        """AuxK (see the module docstring). ``z`` is the dense pre-activation (with autograd on the dense path)."""
        zero = x_hat.new_zeros(())
        if dead_mask is None:
            return zero
        n = int(dead_mask.sum()) if n_dead is None else int(n_dead)
        k_aux = min(int(self.cfg.aux_k or self.d_in // 2), n, self.d_sae)
        if k_aux <= 0:
            return zero
        e = (x2 - x_hat).detach()
        with torch.no_grad():
            cand = torch.where(dead_mask.to(z.device)[None, :], z.detach(), float("-inf"))
            top = cand.topk(k_aux, dim=-1, sorted=False)
        lat = from_topk(top.indices, top.values, self.d_sae)
        keep = torch.isfinite(lat.vals)  # a stale n_dead may exceed the latents that are dead now
        if self.kernel_mode != "dense":  # (entries not kept get weight 0: no data-dependent shapes, no sync)
            vals = gather_pre(lat, xc, self.W_enc, self.b_enc, z) * keep
            recons = sparse_decode(lat.with_vals(vals), self.W_dec)
        else:
            acts = torch.zeros_like(z).index_put((lat.rows[keep], lat.cols[keep]), z[lat.rows[keep], lat.cols[keep]])
            recons = acts @ self.W_dec
        return float(self.cfg.aux_k_coefficient) * (recons - e).pow(2).sum(-1).mean()


class TopKSAE(TopKFamilySAE):
    """f_t = the k largest entries of ReLU(z_t)."""

    architecture = "topk"

    def _select(self, z: torch.Tensor) -> SparseLatents:
        k = min(int(self.cfg.k), self.d_sae)
        top = z.topk(k, dim=-1, sorted=False)
        return from_topk(top.indices, top.values, self.d_sae)


class BatchTopKSAE(TopKFamilySAE):
    """Top k * B of ReLU(z) over the batch in training; ReLU(z) * 1[z > theta] at inference."""

    architecture = "batchtopk"

    def __init__(self, cfg, device=None):
        super().__init__(cfg, device)
        self.register_buffer("topk_threshold", torch.zeros((), dtype=self.dtype, device=device))

    def _select(self, z: torch.Tensor) -> SparseLatents:
        n = min(int(self.cfg.k) * z.shape[0], z.numel())
        flat = torch.relu(z).reshape(-1)
        top = flat.topk(n, sorted=False)
        return from_flat_indices(top.indices, z.shape[0], self.d_sae, top.values)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The inference function: f = ReLU(z) * 1[z > theta]."""
        z = self.encode_pre(x)
        return torch.relu(z) * (z > self.topk_threshold).to(z.dtype)

    def _after_forward(self, vals: torch.Tensor) -> None:
        """theta <- (1 - r) theta + r min{kept f > 0}, without a host sync (unchanged when nothing is > 0)."""
        r = float(self.cfg.topk_threshold_lr)
        m = torch.where(vals > 0, vals, float("inf")).min() if vals.numel() else vals.new_tensor(float("inf"))
        m = m.to(self.topk_threshold.dtype)
        new = (1.0 - r) * self.topk_threshold + r * m
        self.topk_threshold.copy_(torch.where(torch.isfinite(m), new, self.topk_threshold))

    def export_state(self):
        _, tensors = super().export_state()
        thr = self.topk_threshold.detach() * torch.ones(self.d_sae, dtype=self.dtype, device=self.device)
        return "jumprelu", {**tensors, "threshold": thr}

    def load_extra_state(self, state) -> None:
        t = state.get("topk_threshold")
        if t is None and "threshold" in state:
            t = state["threshold"].reshape(-1).mean()
        if t is not None:
            with torch.no_grad():
                self.topk_threshold.copy_(t.reshape(()).to(self.dtype))


class MatryoshkaSAE(BatchTopKSAE):
    """BatchTopK whose nested dictionary prefixes each reconstruct x (see the module docstring)."""

    architecture = "matryoshka"

    def __init__(self, cfg, device=None):
        widths = [int(w) for w in (cfg.matryoshka_widths or [])]
        if widths and widths[-1] != int(cfg.d_sae):
            widths.append(int(cfg.d_sae))
        if not widths or any(b <= a for a, b in zip(widths, widths[1:])) or widths[0] <= 0 or \
                widths[-1] != int(cfg.d_sae):
            raise ValueError(f"matryoshka_widths must increase strictly from > 0 up to d_sae={cfg.d_sae}; got "
                             f"{cfg.matryoshka_widths}.")
        cfg.matryoshka_widths = widths
        super().__init__(cfg, device)

    def _prefix_terms(self, x2, lat: Optional[SparseLatents], f: Optional[torch.Tensor]) -> dict:
        """inner_mse_loss_<m> for every prefix m_l < d_sae: mse(b_dec + sum_{i < m_l} f_i W_dec,i, x)."""
        terms, partial, start = {}, self.b_dec, 0
        for m in self.cfg.matryoshka_widths[:-1]:
            if lat is not None:
                band = lat.select((lat.cols >= start) & (lat.cols < m))
                partial = partial + sparse_decode(band, self.W_dec)
            else:
                partial = partial + f[:, start:m] @ self.W_dec[start:m]
            terms[f"inner_mse_loss_{m}"] = self.mse(x2, partial.expand_as(x2))
            start = m
        return terms
