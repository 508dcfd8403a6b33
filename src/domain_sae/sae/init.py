"""Initialisation of a :class:`~domain_sae.sae.standard.StandardSAE` (SPEC section 1, "Initialisation").

Order of operations (all random draws come from the one ``generator``, so the result is a pure function of it):

1. Decoder: ``decoder_heuristic_init`` -> rows drawn from N(0, 1), each rescaled to L2 norm ``decoder_init_norm``;
   otherwise Kaiming-uniform, U(-b, b) with b = sqrt(6 / d_sae) (fan-in of the decoder is d_sae).
   ``normalize_sae_decoder`` -> every row rescaled to norm 1.
2. Encoder: ``init_encoder_as_decoder_transpose`` -> W_enc = W_dec^T; otherwise Kaiming-uniform,
   U(-b, b) with b = sqrt(6 / d_in).
3. b_enc = 0.
4. b_dec: ``zeros``; ``mean`` = mean of the sample; ``geometric_median`` = argmin_y sum_t ||x_t - y||_2, computed
   with Weiszfeld iterations on the sample (the sample is x' = s x, already scaled by the caller).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from ..config import ConfigError


def _opt(cfg: Any, name: str, default: Any) -> Any:
    return getattr(cfg, name, default) if cfg is not None else default


def _kaiming_uniform(shape: tuple[int, int], fan_in: int, generator: torch.Generator) -> torch.Tensor:
    """U(-b, b) with b = gain * sqrt(3 / fan_in), gain = sqrt(2) (ReLU): b = sqrt(6 / fan_in). float64 on CPU."""
    bound = math.sqrt(6.0 / fan_in)
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2.0 - 1.0) * bound


def geometric_median(points: torch.Tensor, *, max_iter: int = 200, tol: float = 1e-7, eps: float = 1e-12,
                     chunk: int = 16384) -> torch.Tensor:
    """Geometric median of ``points`` [N, d] (argmin_y sum_i ||p_i - y||_2) by Weiszfeld iterations.

    y_0 = mean; y_{k+1} = sum_i w_i p_i / sum_i w_i with w_i = 1 / max(||p_i - y_k||, eps); stops when
    ||y_{k+1} - y_k|| <= tol * (1 + ||y_k||). Accumulates in float64 (row chunks, to bound memory); returns float64.
    """
    pts = points.reshape(-1, points.shape[-1])
    if pts.shape[0] == 0:
        raise ValueError("Cannot compute a geometric median of an empty sample.")

    def chunks():
        for i in range(0, pts.shape[0], chunk):
            yield pts[i:i + chunk].to(torch.float64)

    y = sum(c.sum(0) for c in chunks()) / pts.shape[0]
    for _ in range(max_iter):
        num = torch.zeros_like(y)
        den = torch.zeros((), dtype=torch.float64, device=y.device)
        for c in chunks():
            w = 1.0 / (c - y).norm(dim=-1).clamp_min(eps)
            num += (w[:, None] * c).sum(0)
            den += w.sum()
        y_new = num / den
        done = float((y_new - y).norm()) <= tol * (1.0 + float(y.norm()))
        y = y_new
        if done:
            break
    return y


@torch.no_grad()
def initialize(sae, cfg: Any, sample: Optional[torch.Tensor] = None,
               generator: Optional[torch.Generator] = None) -> None:
    """Initialise ``sae`` in place from the SAEConfig fields of ``cfg`` (see the module docstring).

    ``sample``: activations [..., d_in] (already scaled to x') used by ``b_dec_init_method`` mean /
    geometric_median. ``generator``: torch.Generator for all random draws; default seeded with ``cfg.seed`` (or 0).
    """
    heuristic = bool(_opt(cfg, "decoder_heuristic_init", True))
    init_norm = float(_opt(cfg, "decoder_init_norm", 0.1))
    transpose = bool(_opt(cfg, "init_encoder_as_decoder_transpose", True))
    b_dec_method = str(_opt(cfg, "b_dec_init_method", "zeros"))
    unit_decoder = bool(_opt(cfg, "normalize_sae_decoder", getattr(sae.cfg, "normalize_sae_decoder", False)))
    scale_by_norm = bool(_opt(cfg, "scale_sparsity_penalty_by_decoder_norm",
                              getattr(sae.cfg, "scale_sparsity_penalty_by_decoder_norm", True)))
    if unit_decoder and (heuristic or scale_by_norm):
        clash = [n for n, v in (("decoder_heuristic_init", heuristic),
                                ("scale_sparsity_penalty_by_decoder_norm", scale_by_norm)) if v]
        raise ConfigError("normalize_sae_decoder=True is incompatible with " + " and ".join(f"{c}=True" for c in clash)
                          + "; set " + ", ".join(f"{c}=false" for c in clash) + " or normalize_sae_decoder=false.")
    if b_dec_method not in ("zeros", "mean", "geometric_median"):
        raise ConfigError(f"b_dec_init_method={b_dec_method!r} is not known; use zeros, mean or geometric_median.")
    if b_dec_method != "zeros" and sample is None:
        raise ConfigError(f"b_dec_init_method={b_dec_method} needs a sample of activations; pass one, or use "
                          f"b_dec_init_method=zeros.")
    if generator is None:
        generator = torch.Generator().manual_seed(int(_opt(cfg, "seed", 0) or 0))

    d_in, d_sae = int(sae.W_enc.shape[0]), int(sae.W_enc.shape[1])
    if heuristic:
        w_dec = torch.randn((d_sae, d_in), generator=generator, dtype=torch.float64)
        w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12) * init_norm
    else:
        w_dec = _kaiming_uniform((d_sae, d_in), d_sae, generator)
    if unit_decoder:
        w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w_enc = w_dec.T.clone() if transpose else _kaiming_uniform((d_in, d_sae), d_in, generator)

    if b_dec_method == "zeros":
        b_dec = torch.zeros(d_in, dtype=torch.float64)
    else:
        x = sample.reshape(-1, sample.shape[-1])
        if x.shape[-1] != d_in:
            raise ConfigError(f"The b_dec init sample has width {x.shape[-1]} but the SAE has d_in={d_in}.")
        if x.shape[0] == 0:
            raise ConfigError(f"b_dec_init_method={b_dec_method} got an empty sample of activations.")
        b_dec = x.to(torch.float64).mean(0) if b_dec_method == "mean" else geometric_median(x)

    for p, v in ((sae.W_dec, w_dec), (sae.W_enc, w_enc), (sae.b_dec, b_dec.cpu())):
        p.copy_(v.to(device=p.device, dtype=p.dtype))
    sae.b_enc.zero_()
