"""The SAE contract: what every architecture implements (:class:`SAE`), the loss record (:class:`LossOutput`) and
:class:`BaseSAE`, the shared nn.Module with the parameters, the decoder, the MSE term, scale folding, decoder-norm
helpers, the sparse/dense kernel switch and save/load.

Notation (SPEC 1): x [..., d_in] (leading dimensions are tokens), W_enc [d_in, d_sae], b_enc [d_sae],
W_dec [d_sae, d_in], b_dec [d_in];

    z     = (x - a * b_dec) W_enc + b_enc      a = 1 if cfg.apply_b_dec_to_input else 0
    f     = act(z)                            (the architecture: ReLU, TopK, BatchTopK, JumpReLU, ...)
    x_hat = f W_dec + b_dec
    mse   = 1/B sum_t sum_j (x_hat_tj - x_tj)^2 / n_t     n_t = 1, or ||x_t - mean_batch(x)||_2 + 1e-6
                                                          for mse_loss_normalization = "dense_batch"

Kernels: ``kernel_mode`` = ``dense`` (matrix products), ``sparse`` (:mod:`.sparse`: gathered decoder rows and
gradients only where f != 0) or ``auto`` (each architecture's choice: TopK family sparse from the start, ReLU sparse
once its measured density is below ``sparse_density_threshold``). Both compute the same function.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol, Union, runtime_checkable

import torch
from torch import nn

from ..models.names import same_model_name
from . import format as fmt
from .model_config import SAECompatibilityError, SAEModelConfig, dtype_from_str, dtype_to_str
from .sparse import SparseLatents, sparse_decode

Latents = Union[torch.Tensor, SparseLatents]
KERNEL_MODES = ("auto", "dense", "sparse")


def affine(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x W + b; for a [B, d] x one fused ``addmm`` (the bias enters the matrix product's output pass instead of a
    second pass over the [B, d_sae] result: about 18 ms less per 4,096 x 4,608 step on CPU)."""
    return torch.addmm(b, x, W) if x.dim() == 2 else x @ W + b


@dataclass
class LossOutput:
    """Terms of one training forward pass. ``l1`` is the UNscaled sparsity term (SPEC 3 ``losses/l1_loss``),
    ``raw_l1`` = coefficient * l1; ``aux`` the auxiliary loss (AuxK; 0 where none); ``total`` = mse + raw_l1 + aux
    (+ the matryoshka inner terms in ``terms``). ``latents`` is f, dense or :class:`~.sparse.SparseLatents`;
    ``f`` gives it dense."""

    total: torch.Tensor
    mse: torch.Tensor
    l1: torch.Tensor
    raw_l1: torch.Tensor
    latents: Latents
    x_hat: torch.Tensor
    aux: Optional[torch.Tensor] = None
    terms: dict = field(default_factory=dict)
    _fired: Optional[torch.Tensor] = field(default=None, init=False, repr=False, compare=False)

    @property
    def f(self) -> torch.Tensor:
        return self.latents.to_dense() if isinstance(self.latents, SparseLatents) else self.latents

    def fired_counts(self) -> torch.Tensor:
        """#{tokens : f_t,i > 0} per latent, long [d_sae], without densifying sparse latents; computed once (the
        trainer's statistics and its log of the same step both read it). Do not modify the result in place."""
        if self._fired is None:
            if isinstance(self.latents, SparseLatents):
                self._fired = self.latents.fired_counts()
            else:
                f = self.latents.detach().reshape(-1, self.latents.shape[-1])
                self._fired = (f > 0).sum(0, dtype=torch.int32).to(torch.long)  # int32 sum: ~40% faster
        return self._fired

    def log_terms(self) -> dict[str, torch.Tensor]:
        """Extra loss terms for the training log (``losses/<name>``)."""
        out = dict(self.terms)
        if self.aux is not None:
            out["auxiliary_reconstruction_loss"] = self.aux
        return out


@runtime_checkable
class SAE(Protocol):
    """What the trainer, the evaluation and the analyses may use of an SAE."""

    cfg: SAEModelConfig
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...
    def decode(self, f: Latents) -> torch.Tensor: ...
    def forward(self, x: torch.Tensor) -> torch.Tensor: ...
    def forward_with_latents(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    def loss(self, x: torch.Tensor, sparsity_coefficient: float, *, dead_mask: Optional[torch.Tensor] = None,
             n_dead: Optional[int] = None) -> LossOutput: ...
    def fold_activation_scale(self, s: float) -> None: ...
    def remove_gradient_parallel_to_decoder_directions(self) -> None: ...
    def set_decoder_norm_to_unit_norm(self) -> None: ...
    def configure_kernels(self, mode: str = "auto", density_threshold: Optional[float] = None) -> None: ...
    def export_state(self) -> tuple[str, dict[str, torch.Tensor]]: ...
    def save(self, path: Union[str, Path], sparsity: Optional[torch.Tensor] = None) -> Path: ...


class BaseSAE(nn.Module, ABC):
    """Parameters W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in], all zero at construction
    (:func:`domain_sae.sae.init.initialize` initialises them). Subclasses set ``architecture`` and implement
    :meth:`encode` and :meth:`loss`."""

    architecture: str = ""
    #: density of f below which ``kernel_mode="auto"`` uses the sparse kernels (ReLU SAEs).
    sparse_density_threshold: float = 0.05

    def __init__(self, cfg: SAEModelConfig, device: Union[str, torch.device, None] = None):
        super().__init__()
        if cfg.architecture != self.architecture:
            raise ValueError(f"{type(self).__name__} got architecture {cfg.architecture!r}; it implements "
                             f"{self.architecture!r}.")
        if int(cfg.d_in) <= 0 or int(cfg.d_sae) <= 0:
            raise ValueError(f"d_in and d_sae must be positive (got d_in={cfg.d_in}, d_sae={cfg.d_sae}).")
        self.cfg = cfg
        kw = dict(dtype=dtype_from_str(cfg.dtype), device=device)
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **kw))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in, **kw))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, **kw))
        self.kernel_mode = "auto"

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

    def configure_kernels(self, mode: str = "auto", density_threshold: Optional[float] = None) -> None:
        """Choose the kernels: ``auto``, ``dense`` or ``sparse`` (see the module docstring)."""
        if mode not in KERNEL_MODES:
            raise ValueError(f"kernel mode {mode!r} is not one of {', '.join(KERNEL_MODES)}.")
        self.kernel_mode = mode
        if density_threshold is not None:
            self.sparse_density_threshold = float(density_threshold)

    # -- forward --------------------------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise SAECompatibilityError(
                f"Input has last dimension {x.shape[-1]} but this SAE expects d_in={self.d_in}; use an SAE trained "
                f"on this hook or pass activations of width {self.d_in}.")

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """x - a b_dec in the SAE's dtype."""
        self._check_input(x)
        x = x.to(self.dtype)
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def encode_pre(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations z = (x - a b_dec) W_enc + b_enc, shape [..., d_sae]."""
        return affine(self.encoder_input(x), self.W_enc, self.b_enc)

    @abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """f = act(z), dense, shape [..., d_sae] (the inference function that is saved)."""

    def decode(self, f: Latents) -> torch.Tensor:
        """x_hat = f W_dec + b_dec, shape [..., d_in] (f dense or :class:`~.sparse.SparseLatents`)."""
        if isinstance(f, SparseLatents):
            return sparse_decode(f, self.W_dec) + self.b_dec
        return f.to(self.dtype) @ self.W_dec + self.b_dec

    def forward_with_latents(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return self.decode(f), f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_latents(x)[0]

    # -- loss -----------------------------------------------------------------------------------------------------
    @abstractmethod
    def loss(self, x: torch.Tensor, sparsity_coefficient: float, *, dead_mask: Optional[torch.Tensor] = None,
             n_dead: Optional[int] = None) -> LossOutput:
        """The training loss on a batch x [..., d_in]. ``dead_mask`` [d_sae] marks dead latents (AuxK);
        ``n_dead`` is a host-side upper bound of their number (lets the TopK family skip a device sync)."""

    def decoder_norms(self) -> torch.Tensor:
        """||W_dec,i||_2 for each latent, shape [d_sae]."""
        return self.W_dec.norm(dim=-1)

    def mse(self, x2: torch.Tensor, x_hat2: torch.Tensor) -> torch.Tensor:
        """SPEC 1 mse of [B, d_in] batches (see the module docstring)."""
        sq = (x_hat2 - x2).pow(2)
        norm = self.cfg.mse_loss_normalization
        if norm == "dense_batch":
            centred = x2 - x2.mean(dim=0, keepdim=True)
            sq = sq / (centred.norm(dim=-1, keepdim=True) + 1e-6)
        elif norm not in ("none", None):
            raise ValueError(f"Unknown mse_loss_normalization {norm!r}; expected 'none' or 'dense_batch'.")
        return sq.sum(dim=-1).mean()

    def unflat(self, x: torch.Tensor, x_hat: torch.Tensor, latents: Latents) -> tuple[torch.Tensor, Latents]:
        """x_hat and (dense) latents back in x's leading shape."""
        if isinstance(latents, torch.Tensor):
            latents = latents.reshape(*x.shape[:-1], self.d_sae)
        return x_hat.reshape(x.shape), latents

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        """x as [B, d_in] in the SAE's dtype."""
        self._check_input(x)
        return x.to(self.dtype).reshape(-1, self.d_in)

    # -- weight surgery -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def fold_activation_scale(self, s: float) -> None:
        """Make the SAE take raw x when it was trained on x' = s x.

        W_enc <- s W_enc, W_dec <- W_dec / s, b_dec <- b_dec / s (b_enc unchanged), so that z(x) is unchanged
        (thresholds on z stay valid), new(x) == old(s x) / s and new.encode(x) == old.encode(s x). Sets
        ``normalize_activations = "none"`` and multiplies ``metadata["activation_scale"]`` by s.
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
    def export_state(self) -> tuple[str, dict[str, torch.Tensor]]:
        """(architecture written to cfg.json, tensors of sae_weights.safetensors) for inference."""
        return self.architecture, {k: getattr(self, k) for k in fmt.REQUIRED_TENSORS}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy architecture-specific tensors (e.g. ``threshold``) from a file's state; the default has none."""

    def save(self, path: Union[str, Path], sparsity: Optional[torch.Tensor] = None) -> Path:
        """Write a SAELens-compatible directory (cfg.json, sae_weights.safetensors, sparsity.safetensors)."""
        return fmt.save_sae(self, path, sparsity=sparsity)

    @classmethod
    def from_state(cls, cfg: SAEModelConfig, state: dict[str, torch.Tensor]) -> "BaseSAE":
        """An SAE of this class with the tensors of ``state`` (already checked by :func:`.format.prepare_state`)."""
        sae = cls(cfg)
        with torch.no_grad():
            for k in fmt.REQUIRED_TENSORS:
                getattr(sae, k).copy_(state[k].to(getattr(sae, k).dtype))
        sae.load_extra_state(state)
        return sae

    @classmethod
    def load(cls, path: Union[str, Path], device: Union[str, torch.device, None] = None) -> "BaseSAE":
        """Load an SAE directory (ours or SAELens's) holding this architecture (see also
        :func:`domain_sae.sae.io.load_sae`, which picks the class and resolves releases and hub paths)."""
        d = Path(path)
        d = d / "sae" if not (d / fmt.CFG_FILE).is_file() and (d / "sae" / fmt.CFG_FILE).is_file() else d
        cfg = fmt.read_cfg(d)
        if cfg.architecture != cls.architecture:
            raise SAECompatibilityError(f"{path} holds a {cfg.architecture} SAE, not a {cls.architecture} one; "
                                        f"load it with domain_sae.sae.load_sae.")
        state = fmt.prepare_state(cfg, fmt.read_safetensors(d / fmt.WEIGHTS_FILE), d / fmt.WEIGHTS_FILE)
        sae = cls.from_state(cfg, state)
        fmt.maybe_fold_known_scale(sae, d / fmt.SAELENS_SCALER_FILE)
        sae.cfg.metadata["source_path"] = str(d.resolve())
        return sae.to(device) if device is not None else sae


def check_compatible(sae: SAE, *, d_in: int, model_name: Optional[str] = None,
                     hook_name: Optional[str] = None) -> None:
    """Raise :class:`SAECompatibilityError` when ``sae`` cannot be used at a hook of width ``d_in`` (or, when both
    sides know them, on another model / hook than it was trained on)."""
    sae_d_in = int(sae.W_dec.shape[1])
    meta = dict(sae.cfg.metadata or {})
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
