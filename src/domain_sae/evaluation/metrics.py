"""Streaming reconstruction metrics of an SAE, accumulated exactly in float64 (SPEC section 3).

One code path serves the trainer's batch-level logs and ``dsae eval`` over a whole held-out set: feed
:meth:`ReconstructionAccumulator.update` any number of times, then call :meth:`ReconstructionAccumulator.compute`.
Notation per token t (only tokens selected by ``mask`` count; N of them): x_t (d_in), x̂_t the reconstruction,
f_t (d_sae) the latents, x̄ = (1/N) Σ_t x_t the mean over ALL accumulated tokens, e_t = ||x_t - x̂_t||²,
v_t = ||x_t - x̄||².

- ``metrics/explained_variance`` = 1 - Σ_t e_t / Σ_t v_t. Σ_t v_t is exact in one pass: with a shift c (the mean
  of the first update's tokens, or the ``mean`` given to the constructor), Σ_t v_t = Σ_t ||x_t - c||² -
  N ||x̄ - c||² (the shift keeps the subtraction well conditioned when ||x̄|| is large compared to the spread).
  NaN when Σ_t v_t = 0 (fewer than two distinct tokens).
- ``metrics/explained_variance_per_token_mean`` and ``metrics/explained_variance_std``: mean and population std
  (ddof 0) over tokens of EV_t = 1 - e_t / v_t, with the SAME x̄ as above (the two-pass definition). Tokens with
  v_t = 0 have no EV_t; they are left out and counted in ``metrics/explained_variance_per_token_skipped``.
  How x̄ is known per token (documented choice): if the exact mean of the tokens that will be fed is given as
  ``mean=`` (a cheap first pass, e.g. the evaluation's capture-only pre-pass), v_t is computed on the fly and only
  two floats per token are kept; ``compute`` checks that the given mean equals the accumulated one and raises
  :class:`MetricError` otherwise. Without ``mean``, each token's x_t is kept (in its input dtype, N·d_in values)
  and v_t is computed in ``compute`` once x̄ is known. Both give the two-pass value.
- ``metrics/mse`` = (1/N) Σ_t e_t (sum over d_in, mean over tokens, as the training loss);
  ``metrics/mse_per_element`` = ``metrics/mse`` / d_in.
- ``metrics/cossim`` = (1/N) Σ_t <x_t, x̂_t> / (||x_t|| ||x̂_t||), a token with ||x_t|| = 0 or ||x̂_t|| = 0
  contributing 0.
- ``metrics/l2_ratio`` = mean over tokens with ||x_t|| > 0 of ||x̂_t|| / ||x_t||.
- ``metrics/relative_reconstruction_bias`` = Σ_t ||x̂_t||² / Σ_t <x_t, x̂_t> (= E||x̂||² / E<x, x̂>; 1 for an
  unbiased reconstruction, < 1 for shrinkage).
- ``metrics/l0`` = (1/N) Σ_t #{i : f_t,i > 0}.
- Per latent i, c_i = #{t : f_t,i > 0} and density p_i = c_i / N. ``sparsity/dead_features`` = #{i : c_i = 0}
  (never fired on these tokens), ``sparsity/dense_features`` = #{i : p_i > 0.1}, ``sparsity/dead_fraction`` and
  ``sparsity/dense_fraction`` the same over d_sae, ``sparsity/below_1e-5`` = #{i : p_i < 1e-5},
  ``sparsity/below_1e-6`` likewise, ``metrics/mean_log10_feature_sparsity`` = mean_i log10(p_i + 1e-10).
  :meth:`ReconstructionAccumulator.log10_feature_density` gives the per-latent log10(p_i + 1e-10) for histograms.
- ``metrics/n_tokens`` = N.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..errors import UserError

__all__ = ["MetricError", "ReconstructionAccumulator", "DENSE_THRESHOLD", "DENSITY_EPS"]

DENSE_THRESHOLD = 0.1
DENSITY_EPS = 1e-10


class MetricError(UserError, ValueError):
    """Inputs a metric cannot be computed from (shape mismatch, no tokens, inconsistent mean); the message says
    what was received and how to fix the call."""


class ReconstructionAccumulator:
    """Streaming float64 reconstruction and sparsity statistics over tokens (formulas in the module docstring).

    ``ReconstructionAccumulator(d_in, d_sae, mean=None, dense_threshold=0.1)``; ``update(x, x_hat, f, mask=None)``
    with ``x``, ``x_hat`` of shape ``[..., d_in]``, ``f`` of shape ``[..., d_sae]`` and an optional boolean
    ``mask`` of shape ``[...]`` selecting the tokens that count; ``compute() -> dict[str, float]``.
    """

    def __init__(self, d_in: int, d_sae: int, *, mean: Optional[Tensor] = None,
                 dense_threshold: float = DENSE_THRESHOLD):
        if int(d_in) <= 0 or int(d_sae) <= 0:
            raise MetricError(f"d_in and d_sae must be positive (got d_in={d_in}, d_sae={d_sae}).")
        self.d_in = int(d_in)
        self.d_sae = int(d_sae)
        self.dense_threshold = float(dense_threshold)
        self.given_mean: Optional[Tensor] = None
        if mean is not None:
            m = torch.as_tensor(mean).detach().to(torch.float64).reshape(-1)
            if m.numel() != self.d_in:
                raise MetricError(f"mean has {m.numel()} values but d_in is {self.d_in}; pass the mean activation "
                                  f"vector of the tokens that will be accumulated.")
            self.given_mean = m
        self.n = 0
        self._shift: Optional[Tensor] = None       # c
        self._sum_dx: Optional[Tensor] = None      # Σ (x - c)          [d_in]
        self._sum_sq_dx = 0.0                      # Σ ||x - c||²
        self._sse = 0.0                            # Σ e_t
        self._sum_cos = 0.0
        self._sum_l2_ratio = 0.0
        self._n_l2 = 0
        self._sum_xhat_sq = 0.0
        self._sum_dot = 0.0
        self._sum_l0 = 0
        self._fire_counts: Optional[Tensor] = None  # int64 [d_sae]
        self._err: list[Tensor] = []               # e_t, float64
        self._var: list[Tensor] = []               # v_t w.r.t. the given mean (mean mode)
        self._xs: list[Tensor] = []                # x_t (store mode)

    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, f: Optional[Tensor], mask: Optional[Tensor] = None, *,
               fired_counts: Optional[Tensor] = None) -> None:
        """Add the tokens of ``x`` [..., d_in], ``x_hat`` [..., d_in], ``f`` [..., d_sae] selected by ``mask``.

        ``fired_counts`` (int [d_sae], c_i of these tokens, no ``mask``) may replace ``f`` (pass ``f=None``) when
        the caller already has it, e.g. from sparse latents, so no dense [tokens, d_sae] tensor is needed."""
        if x.shape[-1] != self.d_in or x_hat.shape != x.shape:
            raise MetricError(f"x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} must both be [..., d_in="
                              f"{self.d_in}]; check that the SAE's d_in matches the hook's width.")
        if f is None:
            if fired_counts is None or mask is not None or tuple(fired_counts.shape) != (self.d_sae,):
                raise MetricError(f"Pass f [..., d_sae={self.d_sae}], or f=None with fired_counts [d_sae] and no "
                                  f"mask.")
        elif f.shape[-1] != self.d_sae or f.shape[:-1] != x.shape[:-1]:
            raise MetricError(f"f {tuple(f.shape)} must be [{', '.join(map(str, x.shape[:-1]))}, d_sae="
                              f"{self.d_sae}] to match x {tuple(x.shape)}.")
        x = x.detach().reshape(-1, self.d_in)
        x_hat = x_hat.detach().reshape(-1, self.d_in).to(x.device)
        f = f.detach().reshape(-1, self.d_sae).to(x.device) if f is not None else None
        if mask is not None:
            mask = torch.as_tensor(mask, device=x.device)
            if mask.dtype != torch.bool or mask.numel() != x.shape[0]:
                raise MetricError(f"mask must be a boolean tensor with one value per token ({x.shape[0]}); got "
                                  f"{mask.dtype} with {mask.numel()} values.")
            mask = mask.reshape(-1)
            x, x_hat, f = x[mask], x_hat[mask], f[mask]
        n = x.shape[0]
        if n == 0:
            return
        xd = x.to(torch.float64)
        xh = x_hat.to(torch.float64)
        if self._shift is None:
            self._shift = (self.given_mean.to(x.device) if self.given_mean is not None else xd.mean(0))
            self._sum_dx = torch.zeros(self.d_in, dtype=torch.float64, device=x.device)
            self._fire_counts = torch.zeros(self.d_sae, dtype=torch.int64, device=x.device)
        dx = xd - self._shift
        self._sum_dx += dx.sum(0)
        self._sum_sq_dx += float((dx * dx).sum())
        err = ((xd - xh) ** 2).sum(-1)
        self._err.append(err)
        self._sse += float(err.sum())
        if self.given_mean is not None:
            self._var.append((dx * dx).sum(-1))
        else:
            self._xs.append(x.clone())
        x_norm = xd.norm(dim=-1)
        xh_norm = xh.norm(dim=-1)
        dot = (xd * xh).sum(-1)
        denom = x_norm * xh_norm
        cos = torch.where(denom > 0, dot / torch.where(denom > 0, denom, torch.ones_like(denom)),
                          torch.zeros_like(denom))
        self._sum_cos += float(cos.sum())
        nz = x_norm > 0
        self._sum_l2_ratio += float((xh_norm[nz] / x_norm[nz]).sum())
        self._n_l2 += int(nz.sum())
        self._sum_xhat_sq += float((xh_norm ** 2).sum())
        self._sum_dot += float(dot.sum())
        counts = (f > 0).sum(0, dtype=torch.int32).to(torch.int64) if f is not None \
            else fired_counts.detach().to(x.device, torch.int64)  # one reduction; L0 is its total
        self._sum_l0 += int(counts.sum())
        self._fire_counts += counts
        self.n += n

    # ------------------------------------------------------------------------------------------------------------
    def mean(self) -> Tensor:
        """x̄, the float64 mean of the accumulated tokens."""
        self._need_tokens()
        return self._shift + self._sum_dx / self.n

    def total_variance(self) -> float:
        """Σ_t ||x_t - x̄||² (float64, exact to rounding)."""
        self._need_tokens()
        d = self._sum_dx / self.n
        return max(self._sum_sq_dx - self.n * float((d * d).sum()), 0.0)

    def feature_counts(self) -> Tensor:
        """c_i = number of tokens on which latent i fired (int64 [d_sae])."""
        self._need_tokens()
        return self._fire_counts.clone()

    def feature_density(self) -> Tensor:
        """p_i = c_i / N (float64 [d_sae])."""
        return self.feature_counts().to(torch.float64) / self.n

    def log10_feature_density(self) -> Tensor:
        """log10(p_i + 1e-10) per latent (float64 [d_sae]); never-fired latents sit at -10."""
        return torch.log10(self.feature_density() + DENSITY_EPS)

    def per_token_explained_variance(self) -> Tensor:
        """EV_t = 1 - e_t / v_t for the tokens with v_t > 0 (float64), in the order they were accumulated."""
        self._need_tokens()
        err = torch.cat(self._err)
        var = self._per_token_variance()
        keep = var > 0
        return 1.0 - err[keep] / var[keep]

    def _per_token_variance(self) -> Tensor:
        mean = self.mean()
        if self.given_mean is not None:
            self._check_given_mean(mean)
            return torch.cat(self._var)
        out = []
        for x in self._xs:
            d = x.to(torch.float64) - mean
            out.append((d * d).sum(-1))
        return torch.cat(out)

    def _check_given_mean(self, mean: Tensor) -> None:
        delta = float((mean - self.given_mean.to(mean.device)).norm())
        scale = math.sqrt(max(self._sum_sq_dx / self.n, 0.0) + float((self.given_mean ** 2).sum()))
        if delta > 1e-6 * scale + 1e-12:
            raise MetricError(f"The mean given to ReconstructionAccumulator differs from the mean of the tokens "
                              f"accumulated (distance {delta:.3g}, scale {scale:.3g}), so per-token explained "
                              f"variance would be wrong. Pass the exact mean of the same tokens (same mask), or "
                              f"no mean at all.")

    def _need_tokens(self) -> None:
        if self.n == 0:
            raise MetricError("No tokens were accumulated (every position was masked out or update was never "
                              "called); evaluate on data that has ordinary (non-special, non-pad) tokens.")

    # ------------------------------------------------------------------------------------------------------------
    def compute(self) -> dict[str, float]:
        """All metrics as ``{key: number}`` (counts as int) with SPEC section 3 names (see the module docstring)."""
        self._need_tokens()
        n = self.n
        total_var = self.total_variance()
        ev = 1.0 - self._sse / total_var if total_var > 0 else math.nan
        ev_t = self.per_token_explained_variance()
        if ev_t.numel():
            ev_mean = float(ev_t.mean())
            ev_std = float(((ev_t - ev_t.mean()) ** 2).mean().sqrt())
        else:
            ev_mean = ev_std = math.nan
        counts = self._fire_counts
        p = counts.to(torch.float64) / n
        out = {
            "metrics/explained_variance": ev,
            "metrics/explained_variance_per_token_mean": ev_mean,
            "metrics/explained_variance_std": ev_std,
            "metrics/explained_variance_per_token_skipped": int(n - ev_t.numel()),
            "metrics/mse": self._sse / n,
            "metrics/mse_per_element": self._sse / (n * self.d_in),
            "metrics/cossim": self._sum_cos / n,
            "metrics/l2_ratio": self._sum_l2_ratio / self._n_l2 if self._n_l2 else math.nan,
            "metrics/relative_reconstruction_bias": (self._sum_xhat_sq / self._sum_dot if self._sum_dot != 0
                                                     else math.nan),
            "metrics/l0": self._sum_l0 / n,
            "metrics/mean_log10_feature_sparsity": float(torch.log10(p + DENSITY_EPS).mean()),
            "sparsity/dead_features": int((counts == 0).sum()),
            "sparsity/dense_features": int((p > self.dense_threshold).sum()),
            "sparsity/dead_fraction": float(int((counts == 0).sum())) / self.d_sae,
            "sparsity/dense_fraction": float(int((p > self.dense_threshold).sum())) / self.d_sae,
            "sparsity/below_1e-5": int((p < 1e-5).sum()),
            "sparsity/below_1e-6": int((p < 1e-6).sum()),
            "metrics/n_tokens": int(n),
        }
        return out
