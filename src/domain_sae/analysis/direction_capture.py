"""Direction capture: how well an SAE's dictionary represents a direction found without it.

The direction is the difference of means of the hook's activations on two prompt sets A and B
(``d = mean(A) - mean(B)``, e.g. code requests vs small talk; Kissane et al. used harmful vs harmless prompts to get
the refusal direction). Metrics, all on ``W_dec [d_sae, d_in]`` (row i = decoder direction of latent i):

- ``reconstruction_cosine``: ``cos(d, SAE(A) - SAE(B))`` -- how much of the direction survives passing the
  activations through the SAE (exact definition in the function).
- ``best_single_latent``: ``max_i cos(W_dec_i, d)``.
- ``topk_least_squares_curve``: relative error of the best linear fit of d by the k latents with the largest score
  (by default the mean activation difference between A and B).
- ``omp_curve``: the same error when orthogonal matching pursuit chooses the k latents greedily.

Relative error of a fit with latent set S and coefficients c: ``||d - sum_{i in S} c_i W_dec_i||_2 / ||d||_2``,
with c the unconstrained least-squares solution (float64). 0 = captured exactly, 1 = nothing captured.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from .errors import AnalysisError
from .overlap import EPS, decoder_matrix


def _as_acts(x: Tensor, name: str) -> Tensor:
    x = torch.as_tensor(x).detach()
    if x.ndim != 2 or x.shape[0] == 0:
        raise AnalysisError(f"{name} must be a non-empty [N, d_in] activation matrix, got shape {tuple(x.shape)}")
    return x


def _as_direction(direction: Tensor, d_in: int) -> Tensor:
    d = torch.as_tensor(direction).detach().flatten().to(torch.float64)
    if d.shape[0] != d_in:
        raise AnalysisError(f"direction has {d.shape[0]} components but the decoder rows have d_in={d_in}")
    if d.norm() <= 0:
        raise AnalysisError("direction is the zero vector; the two prompt sets gave identical mean activations")
    return d


def _cos(u: Tensor, v: Tensor) -> float:
    u, v = u.to(torch.float64).flatten(), v.to(torch.float64).flatten()
    return float((u @ v) / (u.norm().clamp_min(EPS) * v.norm().clamp_min(EPS)))


def diff_of_means(acts_a: Tensor, acts_b: Tensor) -> Tensor:
    """``mean_n acts_a[n] - mean_n acts_b[n]`` (means accumulated in float64), returned in ``acts_a``'s float dtype.

    ``acts_a [Na, d]`` and ``acts_b [Nb, d]`` are the hook's activations on the two prompt sets (the caller chooses
    which positions: all non-special tokens, or the last prompt token)."""
    a, b = _as_acts(acts_a, "acts_a"), _as_acts(acts_b, "acts_b")
    if a.shape[1] != b.shape[1]:
        raise AnalysisError(f"acts_a and acts_b have different widths: {a.shape[1]} vs {b.shape[1]}")
    out_dtype = a.dtype if a.is_floating_point() else torch.float32
    return (a.to(torch.float64).mean(0) - b.to(torch.float64).mean(0)).to(out_dtype)


def _sae_param_dtype(sae: Any) -> torch.dtype:
    return sae.W_dec.dtype


@torch.no_grad()
def _reconstruct(sae: Any, x: Tensor, batch_size: int) -> Tensor:
    """``decode(encode(x))`` in batches; returns float64 ``[N, d_in]``."""
    dev, dt = sae.W_dec.device, _sae_param_dtype(sae)
    parts = [sae.decode(sae.encode(x[i:i + batch_size].to(dev, dt))).to(torch.float64).cpu()
             for i in range(0, x.shape[0], batch_size)]
    return torch.cat(parts)


@torch.no_grad()
def reconstruction_cosine(sae: Any, a: Tensor, b: Tensor, *, batch_size: int = 4096) -> float:
    """Cosine between the difference-of-means direction and its image through the SAE.

    Two inputs forms, chosen by the shape of ``a`` and ``b``:

    - means ``[d_in]`` (``a = mean_a``, ``b = mean_b``): ``cos(mean_a - mean_b, SAE(mean_a) - SAE(mean_b))``.
    - activation sets ``[Na, d_in]``, ``[Nb, d_in]``: ``cos(mean(A) - mean(B), mean_n SAE(A_n) - mean_n SAE(B_n))``,
      i.e. the direction recomputed from the SAE's reconstructions of every activation (the form Kissane et al.'s
      "reconstruction fidelity" measures).

    ``SAE(x) = decode(encode(x))`` (b_dec cancels in the difference). 1 = the SAE keeps the direction exactly.
    """
    a = torch.as_tensor(a).detach()
    b = torch.as_tensor(b).detach()
    if a.ndim != b.ndim or a.ndim not in (1, 2) or a.shape[-1] != b.shape[-1]:
        raise AnalysisError(f"pass two mean vectors [d_in] or two activation sets [N, d_in]; got shapes "
                            f"{tuple(a.shape)} and {tuple(b.shape)}")
    d_in = sae.W_dec.shape[1]
    if a.shape[-1] != d_in:
        raise AnalysisError(f"activations have width {a.shape[-1]} but the SAE has d_in={d_in}")
    a2, b2 = (a[None], b[None]) if a.ndim == 1 else (a, b)
    direction = a2.to(torch.float64).mean(0) - b2.to(torch.float64).mean(0)
    _as_direction(direction, d_in)
    recon = _reconstruct(sae, a2, batch_size).mean(0) - _reconstruct(sae, b2, batch_size).mean(0)
    return _cos(direction, recon)


def best_single_latent(W_dec: Any, direction: Tensor, *, absolute: bool = False) -> tuple[int, float]:
    """``(i*, cos(W_dec_i*, d))`` with ``i* = argmax_i cos(W_dec_i, d)`` (or ``argmax |cos|`` when ``absolute``;
    the signed cosine is returned either way). Signed by default: latents are non-negative, so only a positive
    multiple of the decoder row can be added."""
    w = decoder_matrix(W_dec).to(torch.float64).cpu()
    d = _as_direction(direction, w.shape[1])
    cos = (w @ d) / (w.norm(dim=1).clamp_min(EPS) * d.norm())
    i = int(torch.argmax(cos.abs() if absolute else cos))
    return i, float(cos[i])


def _check_ks(ks: Iterable[int], limit: int, what: str) -> list[int]:
    ks = [int(k) for k in ks]
    if not ks:
        raise AnalysisError("ks is empty; pass e.g. range(1, 65)")
    bad = [k for k in ks if k < 1 or k > limit]
    if bad:
        raise AnalysisError(f"k values {bad} are out of range 1..{limit} ({what})")
    return ks


def _lstsq_rel_error(rows: Tensor, d: Tensor) -> tuple[Tensor, float]:
    """Least-squares fit ``d ~ rows^T c`` (float64); returns (c, ||d - rows^T c|| / ||d||)."""
    A = rows.T  # [d_in, k]
    c = torch.linalg.lstsq(A, d[:, None], driver="gelsd").solution[:, 0]
    return c, float((d - A @ c).norm() / d.norm())


def topk_least_squares_curve(W_dec: Any, direction: Tensor, score: Tensor, ks: Iterable[int]) -> Tensor:
    """Relative error (float64 ``[len(ks)]``) of fitting d with the k latents of largest ``score``.

    For each k: ``S_k`` = indices of the k largest ``score`` values (ties: lower index first), ``c`` = argmin
    ``||d - W_dec[S_k]^T c||`` (``torch.linalg.lstsq`` in float64), error ``||d - W_dec[S_k]^T c|| / ||d||``.
    ``score [d_sae]`` is typically ``mean_activation_difference(sae, acts_a, acts_b)``."""
    w = decoder_matrix(W_dec).to(torch.float64).cpu()
    d = _as_direction(direction, w.shape[1])
    s = torch.as_tensor(score).detach().flatten().to(torch.float64).cpu()
    if s.shape[0] != w.shape[0]:
        raise AnalysisError(f"score has {s.shape[0]} entries but the decoder has d_sae={w.shape[0]}")
    ks = _check_ks(ks, w.shape[0], "k cannot exceed d_sae")
    order = torch.argsort(-s, stable=True)
    return torch.tensor([_lstsq_rel_error(w[order[:k]], d)[1] for k in ks], dtype=torch.float64)


def omp(W_dec: Any, direction: Tensor, k_max: int) -> tuple[list[int], Tensor]:
    """Orthogonal matching pursuit for ``k_max`` steps.

    Start with residual r = d. Each step selects ``argmax_i |<r, W_dec_i / ||W_dec_i||>|`` over latents not yet
    selected (zero decoder rows are never selected), re-fits all selected coefficients by least squares (float64)
    and sets r = d - W_dec[S]^T c. Returns (selected indices in order, relative error after each step ``[k_max]``).
    Stops early with error 0 when the residual vanishes (the remaining entries are 0)."""
    w = decoder_matrix(W_dec).to(torch.float64).cpu()
    d = _as_direction(direction, w.shape[1])
    norms = w.norm(dim=1)
    usable = norms > EPS
    n_usable = int(usable.sum())
    if k_max < 1 or k_max > n_usable:
        raise AnalysisError(f"k_max={k_max} is out of range 1..{n_usable} (number of non-zero decoder rows)")
    unit = w / norms.clamp_min(EPS)[:, None]
    available = usable.clone()
    selected: list[int] = []
    errors = torch.zeros(k_max, dtype=torch.float64)
    r = d.clone()
    for step in range(k_max):
        if r.norm() <= 1e-12 * d.norm():
            break  # exact fit reached; errors stay 0
        corr = (unit @ r).abs()
        corr[~available] = -1.0
        i = int(torch.argmax(corr))
        selected.append(i)
        available[i] = False
        c, err = _lstsq_rel_error(w[selected], d)
        r = d - w[selected].T @ c
        errors[step] = err
    return selected, errors


def omp_curve(W_dec: Any, direction: Tensor, ks: Iterable[int] = range(1, 65)) -> Tensor:
    """Relative error (float64 ``[len(ks)]``) of the OMP fit with k latents, for each k in ``ks`` (one OMP run to
    ``max(ks)``; see ``omp``)."""
    w = decoder_matrix(W_dec)
    ks = _check_ks(ks, w.shape[0], "k cannot exceed d_sae")
    _, errors = omp(w, direction, max(ks))
    return errors[torch.tensor(ks) - 1]


@torch.no_grad()
def mean_activation_difference(sae: Any, acts_a: Tensor, acts_b: Tensor, *, batch_size: int = 4096) -> Tensor:
    """``mean_n encode(A_n) - mean_n encode(B_n)`` (float32 ``[d_sae]``, accumulated in float64): which latents
    fire more on prompt set A than on B; the default ranking for ``topk_least_squares_curve``."""
    a, b = _as_acts(acts_a, "acts_a"), _as_acts(acts_b, "acts_b")
    dev, dt = sae.W_dec.device, _sae_param_dtype(sae)

    def mean_f(x: Tensor) -> Tensor:
        total = None
        for i in range(0, x.shape[0], batch_size):
            f = sae.encode(x[i:i + batch_size].to(dev, dt)).to(torch.float64).sum(0).cpu()
            total = f if total is None else total + f
        return total / x.shape[0]

    return (mean_f(a) - mean_f(b)).to(torch.float32)


def direction_capture(sae: Any, acts_a: Tensor, acts_b: Tensor, ks: Iterable[int] = range(1, 65), *,
                      batch_size: int = 4096) -> dict[str, Any]:
    """All direction-capture metrics of one SAE as a JSON-ready dict.

    Keys: ``direction_norm``, ``reconstruction_cosine`` (activation-set form), ``reconstruction_cosine_of_means``
    (mean form), ``best_latent``, ``best_latent_cosine``, ``ks``, ``topk_lstsq_rel_error`` (ranking: mean activation
    difference), ``omp_rel_error``, ``omp_latents``; the direction is ``diff_of_means(acts_a, acts_b)``. ks larger
    than d_sae are dropped."""
    a, b = _as_acts(acts_a, "acts_a"), _as_acts(acts_b, "acts_b")
    d = diff_of_means(a, b)
    w = decoder_matrix(sae)
    ks = [int(k) for k in ks if 1 <= int(k) <= w.shape[0]]
    idx, cos = best_single_latent(w, d)
    score = mean_activation_difference(sae, a, b, batch_size=batch_size)
    selected, omp_err = omp(w, d, max(ks))
    return {
        "direction_norm": float(d.to(torch.float64).norm()),
        "reconstruction_cosine": reconstruction_cosine(sae, a, b, batch_size=batch_size),
        "reconstruction_cosine_of_means": reconstruction_cosine(sae, a.to(torch.float64).mean(0),
                                                                b.to(torch.float64).mean(0)),
        "best_latent": idx, "best_latent_cosine": cos, "ks": ks,
        "topk_lstsq_rel_error": topk_least_squares_curve(w, d, score, ks).tolist(),
        "omp_rel_error": omp_err[torch.tensor(ks) - 1].tolist(),
        "omp_latents": selected,
    }
