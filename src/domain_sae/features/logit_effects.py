"""Decoder-direction statistics: direct-path logit effects and nearest latents.

Direct path: a latent's decoder row d_i is added to the residual stream at the hook; on its direct path to the
logits it goes through the final norm and the unembedding W_U [V, d]. The final norm is handled as the model
computes it, with its scale frozen (the value it has on the token, as in direct logit attribution):

    LayerNorm:  N(h) = g * (h - mean h) / sigma(h) + b   ->  effect(d) = W_U (g * P d) / sigma,  P d = d - mean(d)
    RMSNorm:    N(h) = g * h / rms(h)                    ->  effect(d) = W_U (g * d) / rms
    (Gemma's RMSNorm multiplies by 1 + g.)

The store keeps ``W_U (g * P d_i)`` per unit activation and unit norm scale (the top tokens do not depend on the
scale); the prompt page divides by the measured sigma / rms of each token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

_FINAL_NORM_PATHS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.final_layernorm",
                     "model.decoder.final_layer_norm", "transformer.norm_f", "model.language_model.norm")


@dataclass
class Unembedding:
    """W_U [V, d] (float32), the final norm's gain g [d] (ones when it has none), whether it centres (LayerNorm),
    its epsilon and the module (for reading its input)."""
    W_U: Tensor
    gain: Tensor
    centre: bool
    eps: float
    norm: nn.Module | None

    def project(self, d: Tensor) -> Tensor:
        """g * P d for rows ``d [..., d_model]``."""
        d = d.to(torch.float32)
        if self.centre:
            d = d - d.mean(-1, keepdim=True)
        return d * self.gain

    def scale(self, h: Tensor) -> Tensor:
        """The norm's frozen scale sigma(h) (LayerNorm) or rms(h) (RMSNorm) for inputs ``h [..., d_model]``."""
        h = h.to(torch.float32)
        if self.centre:
            return torch.sqrt(h.var(-1, unbiased=False) + self.eps)
        return torch.sqrt(h.pow(2).mean(-1) + self.eps)


def find_unembedding(model: nn.Module) -> Unembedding | None:
    """The unembedding and final norm of a causal LM, or None when the model has no output embedding."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None or not hasattr(out, "weight"):
        return None
    W_U = out.weight.detach().to(torch.float32)
    modules = dict(model.named_modules())
    norm = next((modules[p] for p in _FINAL_NORM_PATHS if p in modules), None)
    d = W_U.shape[1]
    if norm is None:
        return Unembedding(W_U, torch.ones(d), False, 0.0, None)
    centre = isinstance(norm, nn.LayerNorm) or "layernorm" in type(norm).__name__.lower() and \
        "rms" not in type(norm).__name__.lower()
    w = getattr(norm, "weight", None)
    gain = torch.ones(d) if w is None else w.detach().to(torch.float32).cpu()
    if "gemma" in type(norm).__name__.lower():
        gain = 1.0 + gain
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-5)))
    return Unembedding(W_U.cpu(), gain, centre, eps, norm)


def logit_effects(W_dec: Tensor, unemb: Unembedding, k: int = 10,
                  chunk: int = 256) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top-k positive and negative direct-path effects ``W_U (g * P d_i)`` per latent:
    ``(pos_vals [d_sae, k], pos_ids, neg_vals (most negative first), neg_ids)``."""
    W = W_dec.detach().to(torch.float32).cpu()
    k = min(k, unemb.W_U.shape[0])
    outs = []
    for s in range(0, W.shape[0], chunk):
        eff = unemb.project(W[s:s + chunk]) @ unemb.W_U.T
        pv, pi = torch.topk(eff, k, dim=1)
        nv, ni = torch.topk(-eff, k, dim=1)
        outs.append((pv, pi, -nv, ni))
    return tuple(torch.cat([o[j] for o in outs]) for j in range(4))  # type: ignore[return-value]


def nearest_latents(W_dec: Tensor, k: int = 10, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """For every latent, the ``k`` other latents of the same SAE with the highest decoder cosine, searched over ALL
    latents (chunked exact matmul): ``(cosines [d_sae, k], indices [d_sae, k])``."""
    W = W_dec.detach().to(torch.float32).cpu()
    U = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n = U.shape[0]
    k = min(k, n - 1)
    if k <= 0:
        return torch.zeros(n, 0), torch.zeros(n, 0, dtype=torch.long)
    vals, idxs = [], []
    for s in range(0, n, chunk):
        sims = U[s:s + chunk] @ U.T
        rows = torch.arange(s, min(s + chunk, n))
        sims[rows - s, rows] = float("-inf")
        v, i = torch.topk(sims, k, dim=1)
        vals.append(v)
        idxs.append(i)
    return torch.cat(vals), torch.cat(idxs)
