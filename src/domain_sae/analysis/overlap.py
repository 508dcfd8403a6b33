"""Dictionary overlap: how much two SAEs on the same hook share their decoder directions.

Notation: ``W_dec`` is ``[d_sae, d_in]``; row i is the decoder direction of latent i. All cosines are between rows:
``cos(u, v) = <u, v> / (max(||u||, eps) * max(||v||, eps))`` so an all-zero row has cosine 0 with everything.

- ``max_cosine(A, B)[i] = max_j cos(A_i, B_j)``: for every latent of A, its nearest neighbour in B (not one-to-one;
  call it with the arguments swapped for the other direction).
- ``hungarian_match(A, B)``: the one-to-one assignment (each latent used at most once) maximising the summed cosine,
  solved exactly by ``scipy.optimize.linear_sum_assignment``; ``matched_fraction`` counts its pairs above a threshold.
- ``decoder_drift(W_init, W_final)[i] = cos(W_init_i, W_final_i)``: how far fine-tuning moved each latent.
- ``domain_specific_latents``: alive on one domain's held-out tokens, dead on the other's.
- ``top_activating_examples``: the k strongest firing positions of one latent with a token context window.
- ``compare_dictionaries``: the JSON-ready summary the comparison report uses.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .errors import AnalysisError

EPS = 1e-8


def decoder_matrix(sae_or_w: Any) -> Tensor:
    """``W_dec [d_sae, d_in]`` of an SAE (anything with a ``W_dec`` attribute) or the tensor itself, detached."""
    w = sae_or_w if isinstance(sae_or_w, Tensor) else sae_or_w.W_dec
    if not isinstance(w, Tensor):
        raise AnalysisError(f"expected an SAE with a W_dec tensor or a [d_sae, d_in] tensor, got {type(sae_or_w)!r}")
    if w.ndim != 2:
        raise AnalysisError(f"a decoder matrix must be 2-D [d_sae, d_in], got shape {tuple(w.shape)}")
    return w.detach()


def _unit_rows(w: Tensor, dtype: torch.dtype = torch.float32, eps: float = EPS) -> Tensor:
    w = w.to(dtype)
    return w / w.norm(dim=1, keepdim=True).clamp_min(eps)


def _check_same_d_in(a: Tensor, b: Tensor, what: str = "decoders") -> None:
    if a.shape[1] != b.shape[1]:
        raise AnalysisError(f"{what} live in different spaces: d_in {a.shape[1]} vs {b.shape[1]}; compare SAEs "
                            "trained on the same model and hook")


def max_cosine(W_dec_a: Any, W_dec_b: Any, *, chunk_size: int = 2048, return_indices: bool = False,
               device: Optional[torch.device | str] = None) -> Tensor | tuple[Tensor, Tensor]:
    """For each latent i of A, ``max_j cos(A_i, B_j)`` (float32 ``[d_sae_a]``); optionally also the argmax j.

    Computed in row chunks of A, so peak extra memory is ``chunk_size * d_sae_b`` floats (2048 x 18432 x 4 B =
    150 MB) whatever the dictionary sizes. For B -> A call ``max_cosine(W_dec_b, W_dec_a)``.
    """
    a, b = decoder_matrix(W_dec_a), decoder_matrix(W_dec_b)
    _check_same_d_in(a, b)
    if a.shape[0] == 0 or b.shape[0] == 0:
        raise AnalysisError(f"empty decoder: d_sae_a={a.shape[0]}, d_sae_b={b.shape[0]}")
    if chunk_size < 1:
        raise AnalysisError(f"chunk_size must be >= 1, got {chunk_size}")
    dev = torch.device(device) if device is not None else a.device
    bn = _unit_rows(b.to(dev))
    values = torch.empty(a.shape[0], dtype=torch.float32)
    indices = torch.empty(a.shape[0], dtype=torch.long)
    for start in range(0, a.shape[0], chunk_size):
        an = _unit_rows(a[start:start + chunk_size].to(dev))
        v, j = (an @ bn.T).max(dim=1)
        values[start:start + an.shape[0]] = v.cpu()
        indices[start:start + an.shape[0]] = j.cpu()
    return (values, indices) if return_indices else values


def cosine_matrix(W_dec_a: Any, W_dec_b: Any) -> Tensor:
    """Full ``[d_sae_a, d_sae_b]`` float32 matrix of decoder-row cosines (memory d_sae_a * d_sae_b * 4 bytes)."""
    a, b = decoder_matrix(W_dec_a), decoder_matrix(W_dec_b)
    _check_same_d_in(a, b)
    return _unit_rows(a) @ _unit_rows(b.to(a.device)).T


class Matching(NamedTuple):
    """One-to-one assignment: latent ``rows[n]`` of A is paired with latent ``cols[n]`` of B at cosine
    ``cosines[n]``; ``min(d_sae_a, d_sae_b)`` pairs, sorted by row."""

    rows: Tensor
    cols: Tensor
    cosines: Tensor


def hungarian_match(W_dec_a: Any, W_dec_b: Any) -> Matching:
    """Exact maximum-total-cosine one-to-one matching of the decoder rows of A and B.

    Solves ``max_{pi} sum_n cos(A_{r_n}, B_{pi(r_n)})`` over injective assignments with
    ``scipy.optimize.linear_sum_assignment(C, maximize=True)`` on the full cosine matrix C. Rectangular dictionaries
    are allowed: every latent of the smaller one is matched. Cost: C is held as float64 (d_a * d_b * 8 bytes: 2.7 GB
    for 18432 x 18432) and the solver is O(n^3), minutes at that size; seconds for a few thousand latents.
    """

    c = cosine_matrix(W_dec_a, W_dec_b).cpu().to(torch.float64).numpy()
    if c.size == 0:
        raise AnalysisError(f"empty decoder: cosine matrix has shape {c.shape}")
    rows, cols = linear_sum_assignment(c, maximize=True)
    cos = c[rows, cols]
    return Matching(torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long),
                    torch.as_tensor(cos, dtype=torch.float32))


def matched_fraction(cosines: Tensor | Sequence[float], threshold: float = 0.7, *,
                     n_latents: Optional[int] = None) -> float:
    """``#{n : cosines[n] >= threshold} / N`` with N = ``n_latents`` if given, else ``len(cosines)`` (for a
    Hungarian matching, the size of the smaller dictionary)."""
    c = torch.as_tensor(cosines, dtype=torch.float64).flatten()
    n = len(c) if n_latents is None else int(n_latents)
    if n <= 0:
        raise AnalysisError("matched_fraction needs at least one cosine (or n_latents > 0)")
    if n < len(c):
        raise AnalysisError(f"n_latents={n} is smaller than the number of matched pairs {len(c)}")
    return float((c >= threshold).sum().item()) / n


def decoder_drift(W_dec_init: Any, W_dec_final: Any) -> Tensor:
    """``drift[i] = cos(W_init_i, W_final_i)`` (same latent index): 1 = unchanged direction, 0 = orthogonal.

    Norm changes alone do not count as drift. Both decoders must have the same shape (a fine-tuned SAE and the SAE
    it started from)."""
    a, b = decoder_matrix(W_dec_init), decoder_matrix(W_dec_final)
    if a.shape != b.shape:
        raise AnalysisError(f"decoder_drift compares a fine-tuned SAE with its own parent: shapes must match, got "
                            f"{tuple(a.shape)} and {tuple(b.shape)}")
    return (_unit_rows(a) * _unit_rows(b.to(a.device))).sum(dim=1).cpu()


class DomainSpecificLatents(NamedTuple):
    """Latent indices alive on domain A and dead on B (``a_only``), and the reverse (``b_only``); each sorted by
    density on the domain where it is alive, highest first."""

    a_only: Tensor
    b_only: Tensor


def domain_specific_latents(density_a: Tensor, density_b: Tensor, alive_threshold: float = 1e-5, *,
                            dead_threshold: Optional[float] = None) -> DomainSpecificLatents:
    """Latents that fire on one domain and (almost) never on the other.

    ``density_X[i]`` is the fraction of domain X's held-out tokens where latent i fired (f_i > 0), measured by the
    caller. Alive on X: ``density_X >= alive_threshold``. Dead on X: ``density_X < alive_threshold`` or, when
    ``dead_threshold`` is given, ``density_X <= dead_threshold`` (``dead_threshold=0`` is SPEC 3's "never fired on
    the eval set"; keep ``dead_threshold < alive_threshold`` to leave a gap between the two).
    """
    da = torch.as_tensor(density_a, dtype=torch.float64).flatten()
    db = torch.as_tensor(density_b, dtype=torch.float64).flatten()
    if da.shape != db.shape:
        raise AnalysisError(f"densities must cover the same latents: {tuple(da.shape)} vs {tuple(db.shape)}")
    if dead_threshold is not None and dead_threshold >= alive_threshold:
        raise AnalysisError(f"dead_threshold ({dead_threshold}) must be below alive_threshold ({alive_threshold})")
    alive_a, alive_b = da >= alive_threshold, db >= alive_threshold
    if dead_threshold is None:
        dead_a, dead_b = ~alive_a, ~alive_b
    else:
        dead_a, dead_b = da <= dead_threshold, db <= dead_threshold

    def ordered(mask: Tensor, density: Tensor) -> Tensor:
        idx = torch.nonzero(mask).flatten()
        order = torch.argsort(-density[idx], stable=True)
        return idx[order]

    return DomainSpecificLatents(ordered(alive_a & dead_b, da), ordered(alive_b & dead_a, db))


def top_activating_examples(f_values: Tensor, token_ids: Tensor, k: int = 10, *, window_before: int = 8,
                            window_after: int = 2, mask: Optional[Tensor] = None,
                            tokenizer: Any = None) -> list[dict[str, Any]]:
    """The ``k`` positions where one latent fires most strongly, with a context window of token ids.

    ``f_values`` and ``token_ids`` have the same shape: ``[S, T]`` (S sequences; windows never cross a sequence) or
    ``[N]`` (one sequence). ``mask`` (same shape, bool) keeps only the True positions (e.g. not special tokens).
    Only positions with ``f > 0`` are returned, so fewer than k when the latent rarely fires. Ties keep the earlier
    position. Each example: ``value``, ``sequence``, ``position``, ``token_id``, ``context_ids`` (tokens
    ``position - window_before .. position + window_after``, clipped to the sequence), ``highlight`` (index of the
    firing token inside ``context_ids``); with a ``tokenizer`` also ``prefix``, ``token``, ``suffix`` text.
    """
    f = torch.as_tensor(f_values).detach().cpu()
    ids = torch.as_tensor(token_ids).detach().cpu()
    if f.shape != ids.shape:
        raise AnalysisError(f"f_values {tuple(f.shape)} and token_ids {tuple(ids.shape)} must have the same shape")
    if f.ndim == 1:
        f, ids = f[None], ids[None]
        mask = None if mask is None else torch.as_tensor(mask)[None]
    if f.ndim != 2:
        raise AnalysisError(f"f_values must be [N] or [S, T], got shape {tuple(f.shape)}")
    if k < 1:
        raise AnalysisError(f"k must be >= 1, got {k}")
    if window_before < 0 or window_after < 0:
        raise AnalysisError("window_before and window_after must be >= 0")
    vals = f.to(torch.float32).clone()
    if mask is not None:
        m = torch.as_tensor(mask, dtype=torch.bool).cpu()
        if m.shape != vals.shape:
            raise AnalysisError(f"mask shape {tuple(m.shape)} does not match f_values {tuple(vals.shape)}")
        vals[~m] = 0.0
    flat = vals.flatten()
    order = torch.argsort(-flat, stable=True)
    n_pos = int((flat > 0).sum().item())
    T = vals.shape[1]
    out: list[dict[str, Any]] = []
    for flat_idx in order[:min(k, n_pos)].tolist():
        s, t = divmod(flat_idx, T)
        lo, hi = max(0, t - window_before), min(T, t + window_after + 1)
        ctx = ids[s, lo:hi].tolist()
        ex: dict[str, Any] = {"value": float(flat[flat_idx]), "sequence": s, "position": t,
                              "token_id": int(ids[s, t]), "context_ids": ctx, "highlight": t - lo}
        if tokenizer is not None:
            ex["prefix"] = tokenizer.decode(ctx[:t - lo])
            ex["token"] = tokenizer.decode([ctx[t - lo]])
            ex["suffix"] = tokenizer.decode(ctx[t - lo + 1:])
        out.append(ex)
    return out


def _summary(values: Tensor, threshold: float, bins: int, hist_range: tuple[float, float],
             include_values: bool) -> dict[str, Any]:
    v = values.to(torch.float64).cpu().numpy()
    counts, edges = np.histogram(np.clip(v, *hist_range), bins=bins, range=hist_range)
    out: dict[str, Any] = {"mean": float(v.mean()), "median": float(np.median(v)),
                           "frac_above_threshold": float((v >= threshold).mean()),
                           "hist_counts": counts.tolist(), "hist_edges": edges.tolist()}
    if include_values:
        out["values"] = v.tolist()
    return out


def compare_dictionaries(sae_a: Any, sae_b: Any, threshold: float = 0.7, *, bins: int = 50,
                         hist_range: tuple[float, float] = (-1.0, 1.0), hungarian: bool = True,
                         max_hungarian_latents: int = 20000, include_values: bool = False,
                         chunk_size: int = 2048) -> dict[str, Any]:
    """JSON-ready overlap summary of two SAEs (or decoder matrices) on the same hook.

    Keys: ``d_sae_a``, ``d_sae_b``, ``threshold``; ``max_cos_a_to_b`` and ``max_cos_b_to_a``, each with ``mean``,
    ``median``, ``frac_above_threshold`` (fraction of latents whose nearest neighbour has cosine >= threshold),
    ``hist_counts``/``hist_edges`` (``bins`` equal bins over ``hist_range``; values outside are clipped into the end
    bins) and, with ``include_values``, the raw per-latent values; ``hungarian`` with ``matched_fraction``,
    ``mean_cosine``, ``n_pairs`` and the histogram of matched-pair cosines, or ``None`` when ``hungarian=False`` or a
    dictionary has more than ``max_hungarian_latents`` latents (the exact solver is O(n^3)).
    """
    a, b = decoder_matrix(sae_a), decoder_matrix(sae_b)
    _check_same_d_in(a, b)
    result: dict[str, Any] = {
        "d_sae_a": int(a.shape[0]), "d_sae_b": int(b.shape[0]), "threshold": float(threshold),
        "max_cos_a_to_b": _summary(max_cosine(a, b, chunk_size=chunk_size), threshold, bins, hist_range,
                                   include_values),
        "max_cos_b_to_a": _summary(max_cosine(b, a, chunk_size=chunk_size), threshold, bins, hist_range,
                                   include_values),
        "hungarian": None,
    }
    if hungarian and max(a.shape[0], b.shape[0]) <= max_hungarian_latents:
        m = hungarian_match(a, b)
        h = _summary(m.cosines, threshold, bins, hist_range, include_values)
        h["matched_fraction"] = matched_fraction(m.cosines, threshold)
        h["mean_cosine"] = h.pop("mean")
        h["n_pairs"] = int(len(m.cosines))
        del h["frac_above_threshold"]  # same number as matched_fraction
        result["hungarian"] = h
    return result
