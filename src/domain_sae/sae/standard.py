"""The standard sparse autoencoder (ReLU + L1), SPEC section 1.

Notation: x is an activation at the hook ([..., d_in]), f the latents ([..., d_sae]).

    z     = (x - a * b_dec) @ W_enc + b_enc         a = 1 if cfg.apply_b_dec_to_input else 0
    f     = ReLU(z)
    x_hat = f @ W_dec + b_dec

Loss over a batch of B tokens (any leading shape is flattened to tokens):

    mse    = 1/B sum_t sum_j (x_hat_tj - x_tj)^2 / n_t      n_t = 1, or ||x_t - mean_batch(x)||_2 + 1e-6
                                                             for mse_loss_normalization = "dense_batch"
    l1     = 1/B sum_t || f_t * s_dec ||_p                   s_dec_i = ||W_dec_i||_2 (or 1), p = lp_norm
    raw_l1 = lambda * l1
    total  = mse + raw_l1

The SAE takes whatever input the caller feeds it; input scaling (``normalize_activations``) is done by the trainer
and folded into the weights with :meth:`StandardSAE.fold_activation_scale` before the SAE is saved for use.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import nn

from ..errors import UserError
from ..models.names import same_model_name

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def dtype_from_str(name: Union[str, torch.dtype]) -> torch.dtype:
    """``"float32"`` / ``"torch.float32"`` / a torch.dtype -> torch.dtype."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).replace("torch.", "").strip()
    aliases = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
               "fp64": "float64", "double": "float64"}
    key = aliases.get(key, key)
    if key not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; expected one of {sorted(DTYPES)}.")
    return DTYPES[key]


def dtype_to_str(dtype: torch.dtype) -> str:
    for k, v in DTYPES.items():
        if v == dtype:
            return k
    raise ValueError(f"Unsupported dtype {dtype}.")


class SAECompatibilityError(UserError):
    """An SAE does not fit the model/hook it is used with (wrong d_in, other model, other hook)."""


@dataclass
class SAEModelConfig:
    """What cfg.json holds about one SAE (besides SAELens bookkeeping added by :mod:`domain_sae.sae.io`).

    ``metadata`` keeps provenance: model_name, hook_name, context_size, prepend_bos, dataset_path,
    training_tokens, activation_scale, lineage, source_path, ...
    """

    architecture: str = "standard"
    d_in: int = 0
    d_sae: int = 0
    dtype: str = "float32"
    apply_b_dec_to_input: bool = False
    normalize_activations: str = "none"
    mse_loss_normalization: str = "none"
    lp_norm: float = 1.0
    scale_sparsity_penalty_by_decoder_norm: bool = True
    normalize_sae_decoder: bool = False
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.metadata is None:
            self.metadata = {}
        if isinstance(self.dtype, torch.dtype):
            self.dtype = dtype_to_str(self.dtype)
        self.dtype = dtype_to_str(dtype_from_str(self.dtype))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["metadata"] = copy.deepcopy(dict(self.metadata))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEModelConfig":
        """Build from a dict, ignoring keys this class does not know."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class LossOutput(NamedTuple):
    """Terms of the SPEC 1 loss. ``l1`` is UNscaled (mean ||f * s_dec||_p); ``raw_l1`` = lambda * l1."""

    total: torch.Tensor
    mse: torch.Tensor
    l1: torch.Tensor
    raw_l1: torch.Tensor
    f: torch.Tensor
    x_hat: torch.Tensor


class StandardSAE(nn.Module):
    """ReLU + L1 sparse autoencoder with parameters W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in],
    b_dec [d_in]. All parameters start at zero; :func:`domain_sae.sae.init.initialize` initialises them."""

    def __init__(self, cfg: SAEModelConfig, device: Union[str, torch.device, None] = None):
        super().__init__()
        if cfg.architecture != "standard":
            raise ValueError(f"StandardSAE got architecture {cfg.architecture!r}; only 'standard' is supported.")
        if int(cfg.d_in) <= 0 or int(cfg.d_sae) <= 0:
            raise ValueError(f"d_in and d_sae must be positive (got d_in={cfg.d_in}, d_sae={cfg.d_sae}).")
        self.cfg = cfg
        dt = dtype_from_str(cfg.dtype)
        kw = dict(dtype=dt, device=device)
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **kw))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in, **kw))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, **kw))

    # -- properties -----------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def _apply(self, fn, *args, **kwargs):  # keep cfg.dtype in sync with .to(dtype) / .half() / ...
        out = super()._apply(fn, *args, **kwargs)
        self.cfg.dtype = dtype_to_str(self.W_enc.dtype)
        return out

    # -- forward --------------------------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise SAECompatibilityError(
                f"Input has last dimension {x.shape[-1]} but this SAE expects d_in={self.d_in}; use an SAE trained "
                f"on this hook or pass activations of width {self.d_in}.")

    def encode_pre(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations z = (x - a b_dec) W_enc + b_enc, shape [..., d_sae]."""
        self._check_input(x)
        x = x.to(self.dtype)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """f = ReLU(z), shape [..., d_sae]."""
        return torch.relu(self.encode_pre(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """x_hat = f W_dec + b_dec, shape [..., d_in]."""
        return f.to(self.dtype) @ self.W_dec + self.b_dec

    def forward_with_latents(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return self.decode(f), f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_latents(x)[0]

    # -- loss -----------------------------------------------------------------------------------------------------
    def decoder_norms(self) -> torch.Tensor:
        """||W_dec,i||_2 for each latent, shape [d_sae]."""
        return self.W_dec.norm(dim=-1)

    def loss(self, x: torch.Tensor, l1_coefficient: float) -> LossOutput:
        """SPEC 1 loss on a batch x [..., d_in] (leading dimensions are tokens). See the module docstring."""
        x_hat, f = self.forward_with_latents(x)
        x2 = x.to(self.dtype).reshape(-1, self.d_in)
        xh2 = x_hat.reshape(-1, self.d_in)
        f2 = f.reshape(-1, self.d_sae)
        sq = (xh2 - x2).pow(2)
        norm = self.cfg.mse_loss_normalization
        if norm == "dense_batch":
            centred = x2 - x2.mean(dim=0, keepdim=True)
            sq = sq / (centred.norm(dim=-1, keepdim=True) + 1e-6)
        elif norm not in ("none", None):
            raise ValueError(f"Unknown mse_loss_normalization {norm!r}; expected 'none' or 'dense_batch'.")
        mse = sq.sum(dim=-1).mean()
        weighted = f2 * self.decoder_norms() if self.cfg.scale_sparsity_penalty_by_decoder_norm else f2
        l1 = weighted.norm(p=float(self.cfg.lp_norm), dim=-1).mean()
        raw_l1 = l1 * float(l1_coefficient)
        return LossOutput(total=mse + raw_l1, mse=mse, l1=l1, raw_l1=raw_l1, f=f, x_hat=x_hat)

    # -- weight surgery -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def fold_activation_scale(self, s: float) -> None:
        """Make the SAE take raw x when it was trained on x' = s x.

        W_enc <- s W_enc, W_dec <- W_dec / s, b_dec <- b_dec / s (b_enc unchanged), so that
        new(x) == old(s x) / s and new.encode(x) == old.encode(s x). Sets ``normalize_activations = "none"`` and
        multiplies ``metadata["activation_scale"]`` by s (sets it when absent).
        """
        s = float(s)
        if not (s > 0.0) or s != s or s == float("inf"):
            raise ValueError(f"Activation scale must be a positive finite number, got {s}.")
        self.W_enc.mul_(s)
        self.W_dec.div_(s)
        self.b_dec.div_(s)
        self.cfg.normalize_activations = "none"
        meta = self.cfg.metadata if self.cfg.metadata is not None else {}
        meta["activation_scale"] = float(meta.get("activation_scale", 1.0) or 1.0) * s
        self.cfg.metadata = meta

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """g_i <- g_i - <g_i, w_i> w_i / ||w_i||^2 for each decoder row w_i (call before the optimizer step)."""
        g = self.W_dec.grad
        if g is None:
            return
        w = self.W_dec.data
        denom = (w * w).sum(dim=-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
        g.sub_((g * w).sum(dim=-1, keepdim=True) / denom * w)

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """W_dec,i <- W_dec,i / ||W_dec,i||_2 (rows of norm 0 stay 0)."""
        n = self.W_dec.norm(dim=-1, keepdim=True)
        self.W_dec.div_(torch.where(n > 0, n, torch.ones_like(n)))

    # -- persistence ----------------------------------------------------------------------------------------------
    def save(self, path: Union[str, Path], sparsity: Optional[torch.Tensor] = None) -> Path:
        """Write a SAELens-compatible directory (cfg.json, sae_weights.safetensors, sparsity.safetensors)."""
        from .io import save_sae
        return save_sae(self, path, sparsity=sparsity)

    @classmethod
    def load(cls, path: Union[str, Path], device: Union[str, torch.device, None] = None) -> "StandardSAE":
        """Load an SAE directory written by us or by SAELens (see :func:`domain_sae.sae.io.load_sae`)."""
        from .io import load_sae
        sae = load_sae(path)
        if not isinstance(sae, cls):
            raise SAECompatibilityError(f"{path} holds a {type(sae).__name__}, not a {cls.__name__}.")
        return sae.to(device) if device is not None else sae


def check_compatible(sae: nn.Module, *, d_in: int, model_name: Optional[str] = None,
                     hook_name: Optional[str] = None) -> None:
    """Raise :class:`SAECompatibilityError` when ``sae`` cannot be used at a hook of width ``d_in`` (or, when both
    sides know them, on another model / hook than it was trained on)."""
    sae_d_in = int(sae.W_dec.shape[1])
    meta = dict(getattr(getattr(sae, "cfg", None), "metadata", None) or {})
    where = f" (trained on {meta.get('model_name')!r}, hook {meta.get('hook_name')!r})" if meta.get("hook_name") \
        else ""
    if sae_d_in != int(d_in):
        raise SAECompatibilityError(
            f"SAE d_in={sae_d_in} does not match the hook's activation width d_in={int(d_in)}{where}. "
            f"Use the model and hook the SAE was trained on, or train a new SAE for this hook.")
    sae_model, sae_hook = meta.get("model_name"), meta.get("hook_name")
    if model_name and sae_model and not same_model_name(sae_model, model_name):
        raise SAECompatibilityError(
            f"SAE was trained on model {sae_model!r} but is used with model {model_name!r}. Use --model "
            f"{sae_model} (or an SAE trained on {model_name}).")
    if hook_name and sae_hook and str(sae_hook) != str(hook_name):
        raise SAECompatibilityError(
            f"SAE was trained at hook {sae_hook!r} but is used at hook {hook_name!r}. Use --hook {sae_hook} "
            f"(or an SAE trained at {hook_name}).")
