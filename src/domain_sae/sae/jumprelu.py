"""JumpReLU SAE (SPEC section 2).

    z = (x - a b_dec) W_enc + b_enc;   theta = exp(log_threshold);   f = z * 1[z > theta];   x_hat = f W_dec + b_dec

(at inference f = ReLU(z) * 1[z > theta], SAELens's form, equal for theta >= 0). The step 1[z > theta] has no
useful gradient in theta, so a straight-through estimator with the rectangle kernel K(u) = 1[|u| < 1/2] and
bandwidth epsilon (``jumprelu_bandwidth``, 0.05) stands in for it:

    d f / d theta       = -(theta / epsilon) K((z - theta) / epsilon)      (d f / d z = 1[z > theta])
    d 1[z > theta] / d theta = -(1 / epsilon) K((z - theta) / epsilon)

Loss = mse + lambda * l1 with (``jumprelu_sparsity_loss``)

    tanh: l1 = 1/B sum_t sum_i tanh(c f_ti ||W_dec,i||)     c = ``jumprelu_tanh_scale`` (4)
    step: l1 = 1/B sum_t sum_i 1[z_ti > theta_i]              (the L0, with the estimator above)

Saved as SAELens ``jumprelu`` with tensor ``threshold`` = theta. Dense kernels only: the estimator needs the
pre-activations near theta of latents that are off.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .base import BaseSAE, LossOutput
from .format import SAEFormatError


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """K(u) = 1 for |u| < 1/2, else 0."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """f = z * 1[z > theta] with the straight-through estimator for theta (see the module docstring)."""

    @staticmethod
    def forward(ctx, z, theta, bandwidth: float):
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = (z > theta).to(g.dtype) * g
        grad_theta = (-(theta / eps) * rectangle((z - theta) / eps) * g).reshape(-1, z.shape[-1]).sum(0)
        return grad_z, grad_theta, None


class StepFunction(torch.autograd.Function):
    """1[z > theta] with the straight-through estimator for theta (no gradient to z)."""

    @staticmethod
    def forward(ctx, z, theta, bandwidth: float):
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = (-(1.0 / eps) * rectangle((z - theta) / eps) * g).reshape(-1, z.shape[-1]).sum(0)
        return None, grad_theta, None


class JumpReLUSAE(BaseSAE):
    """JumpReLU SAE with a learned per-latent threshold theta = exp(log_threshold)."""

    architecture = "jumprelu"

    def __init__(self, cfg, device=None):
        super().__init__(cfg, device)
        if cfg.jumprelu_sparsity_loss not in ("tanh", "step"):
            raise ValueError(f"jumprelu_sparsity_loss must be tanh or step, got {cfg.jumprelu_sparsity_loss!r}.")
        init = float(cfg.jumprelu_init_threshold)
        if not init > 0:
            raise ValueError(f"jumprelu_init_threshold must be positive, got {init}.")
        self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), init, dtype=self.dtype, device=device).log())

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """f = ReLU(z) * 1[z > theta], shape [..., d_sae]."""
        z = self.encode_pre(x)
        return torch.relu(z) * (z > self.threshold).to(z.dtype)

    def loss(self, x: torch.Tensor, sparsity_coefficient: float, *, dead_mask: Optional[torch.Tensor] = None,
             n_dead: Optional[int] = None) -> LossOutput:
        """mse + lambda * l1 (see the module docstring); ``dead_mask`` / ``n_dead`` are not used."""
        x2 = self.flat(x)
        z = self.encode_pre(x2)
        theta = self.threshold
        eps = float(self.cfg.jumprelu_bandwidth)
        f = JumpReLUFunction.apply(z, theta, eps)
        x_hat = f @ self.W_dec + self.b_dec
        mse = self.mse(x2, x_hat)
        if self.cfg.jumprelu_sparsity_loss == "tanh":
            l1 = torch.tanh(float(self.cfg.jumprelu_tanh_scale) * f * self.decoder_norms()).sum(-1).mean()
        else:
            l1 = StepFunction.apply(z, theta, eps).sum(-1).mean()
        raw_l1 = l1 * float(sparsity_coefficient)
        x_hat, f = self.unflat(x, x_hat, f)
        return LossOutput(total=mse + raw_l1, mse=mse, l1=l1, raw_l1=raw_l1, latents=f, x_hat=x_hat)

    def export_state(self):
        arch, tensors = super().export_state()
        return arch, {**tensors, "threshold": self.threshold.detach()}

    def load_extra_state(self, state) -> None:
        if "threshold" not in state:
            raise SAEFormatError("A jumprelu SAE needs the tensor 'threshold' [d_sae] in sae_weights.safetensors.")
        with torch.no_grad():
            self.log_threshold.copy_(state["threshold"].to(torch.float64).log().to(self.dtype))
