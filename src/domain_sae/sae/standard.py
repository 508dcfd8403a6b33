"""The standard sparse autoencoder (ReLU + L1), SPEC section 1.

    z = (x - a b_dec) W_enc + b_enc;   f = ReLU(z);   x_hat = f W_dec + b_dec
    mse    = 1/B sum_t sum_j (x_hat_tj - x_tj)^2 / n_t     (see :mod:`.base`)
    l1     = 1/B sum_t || f_t * s_dec ||_p                  s_dec_i = ||W_dec_i||_2 (or 1), p = lp_norm
    raw_l1 = lambda * l1;   total = mse + raw_l1

Kernels: with ``kernel_mode="auto"`` the SAE measures the density of f (fraction of non-zero entries) every
``DENSITY_CHECK_EVERY`` training forward passes on a GPU (the reading is a host sync), every pass elsewhere (free),
and uses the sparse kernels of :mod:`.sparse` while it is below ``sparse_density_threshold`` (gradients then flow
only through the non-zero f, which is exactly the ReLU's gradient). The counter and the current choice are part of
the state dict (``_extra_state``) so that a resumed run makes the same choices.

The SAE takes whatever input the caller feeds it; input scaling (``normalize_activations``) is done by the trainer
and folded into the weights with :meth:`fold_activation_scale` before the SAE is saved for use.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .base import BaseSAE, LossOutput, affine, check_compatible
from .model_config import DTYPES, SAECompatibilityError, SAEModelConfig, dtype_from_str, dtype_to_str
from .sparse import from_positive, gather_pre, sparse_decode

# Names other modules import from here (kept for compatibility).
__all__ = ["StandardSAE", "SAEModelConfig", "LossOutput", "SAECompatibilityError", "check_compatible", "DTYPES",
           "dtype_from_str", "dtype_to_str", "DENSITY_CHECK_EVERY"]

#: training forward passes between two density measurements of the auto kernel switch on a GPU (every pass on CPU).
DENSITY_CHECK_EVERY = 25


class StandardSAE(BaseSAE):
    """ReLU + L1 sparse autoencoder."""

    architecture = "standard"

    def __init__(self, cfg: SAEModelConfig, device: Union[str, torch.device, None] = None):
        super().__init__(cfg, device)
        self._calls = 0
        self._sparse_now = False

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor([self._calls, int(self._sparse_now)], dtype=torch.long)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self._calls, self._sparse_now = int(state[0]), bool(state[1])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the kernel switch existed have no _extra_state: keep the current one
        state_dict.setdefault(prefix + "_extra_state", self.get_extra_state())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """f = ReLU(z), shape [..., d_sae]."""
        return torch.relu(self.encode_pre(x))

    def uses_sparse_kernels(self) -> bool:
        """Whether the next training forward pass runs the sparse kernels."""
        return self.kernel_mode == "sparse" or (self.kernel_mode == "auto" and self._sparse_now)

    def _observe_density(self, density_fn, device: torch.device) -> None:
        every = DENSITY_CHECK_EVERY if device.type == "cuda" else 1
        if self.kernel_mode == "auto" and self._calls % every == 0:
            self._sparse_now = float(density_fn()) < self.sparse_density_threshold
        self._calls += 1

    def loss(self, x: torch.Tensor, l1_coefficient: float, *, dead_mask: Optional[torch.Tensor] = None,
             n_dead: Optional[int] = None) -> LossOutput:
        """SPEC 1 loss on a batch x [..., d_in] (leading dimensions are tokens). See the module docstring.
        ``dead_mask`` / ``n_dead`` are not used by this architecture."""
        x2 = self.flat(x)
        p = float(self.cfg.lp_norm)
        n_tok = x2.shape[0]
        if self.uses_sparse_kernels():
            xc = x2 - self.b_dec if self.cfg.apply_b_dec_to_input else x2
            with torch.no_grad():
                z = affine(xc, self.W_enc, self.b_enc)
            lat = from_positive(z)
            lat = lat.with_vals(gather_pre(lat, xc, self.W_enc, self.b_enc, z))
            x_hat = sparse_decode(lat, self.W_dec) + self.b_dec
            w = lat.vals * self.decoder_norms()[lat.cols] if self.cfg.scale_sparsity_penalty_by_decoder_norm \
                else lat.vals
            per_token = w.new_zeros(n_tok).index_add(0, lat.rows, w.abs() if p == 1.0 else w.abs().pow(p))
            if p != 1.0:  # (safe gradient for tokens without active latents)
                per_token = torch.where(per_token > 0, per_token, 1.0).pow(1.0 / p) * (per_token > 0)
            l1 = per_token.mean()
            latents = lat
            nnz = lat.rows.shape[0]
            self._observe_density(lambda: nnz / max(n_tok * self.d_sae, 1), x2.device)
        else:
            f = torch.relu(self.encode_pre(x2))
            x_hat = f @ self.W_dec + self.b_dec
            if p == 1.0:  # f >= 0, so ||f * s||_1 = f . s: a matrix-vector product, not a [B, d_sae] temporary
                s_dec = self.decoder_norms() if self.cfg.scale_sparsity_penalty_by_decoder_norm else None
                l1 = (f @ s_dec if s_dec is not None else f.sum(-1)).mean()
            else:
                weighted = f * self.decoder_norms() if self.cfg.scale_sparsity_penalty_by_decoder_norm else f
                l1 = weighted.norm(p=p, dim=-1).mean()
            latents = f
            self._observe_density(lambda: (f.detach() > 0).float().mean(), x2.device)
        mse = self.mse(x2, x_hat)
        raw_l1 = l1 * float(l1_coefficient)
        x_hat, latents = self.unflat(x, x_hat, latents)
        return LossOutput(total=mse + raw_l1, mse=mse, l1=l1, raw_l1=raw_l1, latents=latents, x_hat=x_hat)
