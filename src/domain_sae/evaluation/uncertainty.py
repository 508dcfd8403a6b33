"""Error bars over documents: per-document sufficient statistics and a bootstrap over documents.

Tokens of one document are correlated, so the unit of resampling is the document (``doc_ids`` of
:class:`~domain_sae.data.sampling.HeldoutSample`; without them, each sequence is its own cluster). Every metric m
of the evaluation is a function of totals T = Σ_d S_d of per-document sums S_d (token counts, Σ CE, Σ ||x - x̂||²,
Σ (x - c), ...). The nonparametric bootstrap over documents draws B replicates; replicate b gives each of the D
documents a weight w_bd ~ Multinomial(D, 1/D) (the number of times it is drawn) and recomputes
m_b = m(Σ_d w_bd S_d). Reported, for every metric (ratio metrics such as explained variance and the CE/KL scores
included; this bootstrap is used for all, no delta method):

    se      = sqrt( 1/(B-1) Σ_b (m_b - mean_b m_b)² )          (bootstrap standard error)
    ci95    = [q_0.025, q_0.975] of the m_b                    (percentile interval)

over the finite replicates (a replicate can be NaN, e.g. a score whose denominator is 0; se is NaN when fewer than
two are finite). For a plain mean over tokens, m = Σ_d s_d / Σ_d n_d, se converges to the cluster (ratio-estimator)
standard error sqrt( Σ_d (s_d - m n_d)² ) / Σ_d n_d as B grows. The replicate weights come from a
``torch.Generator`` seeded with ``seed``, so error bars are deterministic.

Per-token EV (``explained_variance_per_token_mean`` / ``_std``) keeps the full-sample mean x̄ in every replicate
(only the tokens are resampled). Latent counts (dead, dense, below 1e-5 / 1e-6, mean log10 density) need a
[D, d_sae] table of per-document firing counts; above ``MAX_FIRE_TABLE`` entries their error bars are left out
(NaN) to bound memory.

Counts that resampling biases (``RESAMPLING_BIASED``: dead latents and their fraction, latents below density
1e-5 / 1e-6, the mean log10 density) get no error bar: se, ci95_low and ci95_high are NaN and ``no_interval``
says why. A latent is dead in replicate b iff Σ_d w_bd c_di = 0, i.e. none of the documents it fired in was drawn;
every latent dead on the sample stays dead, so dead_b >= dead in every replicate, and a replicate keeps only about
1 - 1/e = 63% of the distinct documents, so latents that fired in few documents fall silent in many replicates.
The replicates sit above the measured value (568 dead latents got the "interval" [572, 600]): they describe
"silent on ~63% of the documents", not the uncertainty of the value. The rare-latent counts drift up and the mean
log10 density down for the same reason. The dense count (fired on more than 10% of the tokens) has no such drift
and keeps its bar.
"""

from __future__ import annotations

import math
from typing import Any, Hashable, Mapping, NamedTuple, Optional

import torch
from torch import Tensor

from .metrics import DENSE_THRESHOLD, DENSITY_EPS

__all__ = ["DocumentSums", "SumKey", "bootstrap_weights", "error_bars", "reconstruction_token_stats",
           "reconstruction_from_totals", "MAX_FIRE_TABLE", "RESAMPLING_BIASED", "NO_INTERVAL_REASON"]

MAX_FIRE_TABLE = 50_000_000
RESAMPLING_BIASED = ("sparsity/dead_features", "sparsity/dead_fraction", "sparsity/below_1e-5",
                     "sparsity/below_1e-6", "metrics/mean_log10_feature_sparsity")
NO_INTERVAL_REASON = ("no error bar: resampling documents leaves more latents silent, so the bootstrap replicates "
                      "of this count sit above the measured value and their percentiles are not an interval for it")


class SumKey(NamedTuple):
    """The name of one per-document sum of the evaluation: its ``group`` (``overall``, ``all_tokens`` or a segment
    name), its ``stat`` (``n``, ``ce``, ``kl``, or a statistic of :func:`reconstruction_token_stats`) and, for
    ``ce`` / ``kl``, the ``condition`` the model ran in (``lm_metrics.Condition``: clean, an SAE spliced in, an
    ablation)."""

    group: str
    stat: str
    condition: Any = None


class DocumentSums:
    """float64 per-document sums of named statistics: ``add(name, values [M] or [M, k], doc [M])`` (doc = cluster
    index in [0, n_docs); ``name`` any hashable key, a :class:`SumKey` in the evaluation); ``totals(weights)`` gives
    Σ_d w_d S_d per name, [B] / [B, k] for weights [B, D], or the plain sums (0-dim / [k]) for ``weights=None``."""

    def __init__(self, n_docs: int):
        self.n_docs = int(n_docs)
        self.sums: dict[Hashable, Tensor] = {}

    def add(self, name: Hashable, values: Tensor, doc: Tensor) -> None:
        v = values.detach().to("cpu", torch.float64)
        if name not in self.sums:
            self.sums[name] = torch.zeros((self.n_docs,) + tuple(v.shape[1:]), dtype=torch.float64)
        self.sums[name].index_add_(0, doc.to("cpu", torch.long), v)

    def totals(self, weights: Optional[Tensor] = None) -> dict[Hashable, Tensor]:
        if weights is None:
            return {k: v.sum(0) for k, v in self.sums.items()}
        return {k: torch.tensordot(weights, v, dims=([1], [0])) for k, v in self.sums.items()}


def bootstrap_weights(n_docs: int, n_boot: int, seed: int) -> Tensor:
    """[B, D] float64: w_bd = how often document d is drawn in replicate b (D draws with replacement)."""
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(n_docs, (n_boot, n_docs), generator=g)
    return torch.zeros(n_boot, n_docs, dtype=torch.float64).scatter_add_(1, idx, torch.ones(n_boot, n_docs,
                                                                                            dtype=torch.float64))


def error_bars(replicates: Mapping[str, Tensor]) -> dict[str, dict[str, Any]]:
    """{metric: {"se", "ci95_low", "ci95_high"}} from each metric's [B] bootstrap replicates (module docstring);
    the ``RESAMPLING_BIASED`` counts get NaN for all three and ``"no_interval": NO_INTERVAL_REASON``."""
    out: dict[str, dict[str, Any]] = {}
    for key, reps in replicates.items():
        if key in RESAMPLING_BIASED:
            out[key] = {"se": math.nan, "ci95_low": math.nan, "ci95_high": math.nan,
                        "no_interval": NO_INTERVAL_REASON}
            continue
        r = reps.to(torch.float64).reshape(-1)
        r = r[torch.isfinite(r)]
        if r.numel() < 2:
            out[key] = {"se": math.nan, "ci95_low": math.nan, "ci95_high": math.nan}
            continue
        q = torch.quantile(r, torch.tensor([0.025, 0.975], dtype=torch.float64))
        out[key] = {"se": float(r.std(correction=1)), "ci95_low": float(q[0]), "ci95_high": float(q[1])}
    return out


def reconstruction_token_stats(x: Tensor, x_hat: Tensor, f: Tensor, mean: Tensor,
                               fires: bool) -> dict[str, Tensor]:
    """Per-token statistics whose sums give the reconstruction metrics (``mean`` = the group's x̄, the shift c):
    n, e = ||x - x̂||², v = ||x - c||², dx = x - c, xh = <x, x̂>, hh = ||x̂||², cos, l2r (with l2n = [||x|| > 0]), l0,
    per-token EV_t = 1 - e/v and EV_t² (with evn = [v > 0]) and, with ``fires``, f > 0 per latent."""
    x, x_hat = x.to(torch.float64), x_hat.to(torch.float64)
    dx = x - mean.to(x.device, torch.float64)
    e = (x - x_hat).pow(2).sum(-1)
    v = dx.pow(2).sum(-1)
    nx, nh = x.norm(dim=-1), x_hat.norm(dim=-1)
    xh = (x * x_hat).sum(-1)
    ok = (nx > 0) & (nh > 0)
    ev_ok = v > 0
    ev_t = torch.where(ev_ok, 1.0 - e / torch.where(ev_ok, v, torch.ones_like(v)), torch.zeros_like(v))
    out = {"n": torch.ones_like(e), "e": e, "v": v, "dx": dx, "xh": xh, "hh": nh.pow(2),
           "cos": torch.where(ok, xh / torch.where(ok, nx * nh, torch.ones_like(nx)), torch.zeros_like(nx)),
           "l2r": torch.where(nx > 0, nh / torch.where(nx > 0, nx, torch.ones_like(nx)), torch.zeros_like(nx)),
           "l2n": (nx > 0).to(torch.float64), "l0": (f > 0).sum(-1).to(torch.float64),
           "evt": ev_t, "evt2": ev_t.pow(2), "evn": ev_ok.to(torch.float64)}
    if fires:
        out["fires"] = (f > 0).to(torch.float64)
    return out


def _div(a: Tensor, b: Tensor) -> Tensor:
    return torch.where(b != 0, a / torch.where(b != 0, b, torch.ones_like(b)), torch.full_like(a, math.nan))


def reconstruction_from_totals(t: Mapping[Hashable, Tensor], group: str) -> dict[str, Tensor]:
    """The reconstruction metrics (SPEC section 3 names, :mod:`.metrics` formulas) of ``group`` from totals of
    :func:`reconstruction_token_stats` (keys ``SumKey(group, stat)``). Leading dims of the totals are kept ([B]
    replicates)."""
    g = {k.stat: v for k, v in t.items() if isinstance(k, SumKey) and k.group == group}
    n = g["n"]
    var = g["v"] - _div(g["dx"].pow(2).sum(-1), n)  # Σ||x - x̄||² = Σ||x - c||² - N||x̄ - c||²
    ev_mean = _div(g["evt"], g["evn"])
    d_in = g["dx"].shape[-1]
    out = {"metrics/explained_variance": 1.0 - _div(g["e"], var),
           "metrics/explained_variance_per_token_mean": ev_mean,
           "metrics/explained_variance_std": (_div(g["evt2"], g["evn"]) - ev_mean.pow(2)).clamp(min=0).sqrt(),
           "metrics/mse": _div(g["e"], n), "metrics/mse_per_element": _div(g["e"], n) / d_in,
           "metrics/cossim": _div(g["cos"], n), "metrics/l2_ratio": _div(g["l2r"], g["l2n"]),
           "metrics/relative_reconstruction_bias": _div(g["hh"], g["xh"]), "metrics/l0": _div(g["l0"], n)}
    if "fires" in g:
        p = _div(g["fires"], n.unsqueeze(-1).expand_as(g["fires"]))
        d_sae = p.shape[-1]
        dead = (g["fires"] == 0).sum(-1).to(torch.float64)
        dense = (p > DENSE_THRESHOLD).sum(-1).to(torch.float64)
        out.update({"sparsity/dead_features": dead, "sparsity/dense_features": dense,
                    "sparsity/dead_fraction": dead / d_sae, "sparsity/dense_fraction": dense / d_sae,
                    "sparsity/below_1e-5": (p < 1e-5).sum(-1).to(torch.float64),
                    "sparsity/below_1e-6": (p < 1e-6).sum(-1).to(torch.float64),
                    "metrics/mean_log10_feature_sparsity": torch.log10(p + DENSITY_EPS).mean(-1)})
    return out
