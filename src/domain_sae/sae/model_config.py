"""What one SAE is, as data: :class:`SAEModelConfig` (the content of cfg.json), the dtype names, the architecture
names this package runs, and the errors for an SAE that does not fit. A leaf: imports nothing from the package
but :mod:`domain_sae.errors`.

Architecture fields (SPEC section 2; ignored by architectures that do not use them):

- ``k``: topk keeps the k largest pre-activations per token; batchtopk and matryoshka keep k * B over a batch.
- ``aux_k_coefficient`` alpha and ``aux_k`` (default d_in // 2): the AuxK loss of the TopK family,
  alpha * mean_t ||e_t - sum_{i in A_t} z_ti W_dec,i||^2 with e = stopgrad(x' - x_hat') and A_t the top
  min(aux_k, #dead) pre-activations of token t among dead latents.
- ``topk_threshold_lr``: EMA rate of the batchtopk inference threshold theta <- (1 - r) theta + r * min kept f.
- ``jumprelu_bandwidth`` (epsilon of the rectangle kernel), ``jumprelu_init_threshold``,
  ``jumprelu_sparsity_loss`` (tanh or step) and ``jumprelu_tanh_scale`` (c).
- ``matryoshka_widths``: increasing prefix sizes m_1 < ... < m_L = d_sae (d_sae is appended when missing).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Union

import torch

from ..errors import UserError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

#: architectures implemented here (keys of :func:`domain_sae.sae.registry.sae_classes`).
ARCHITECTURES = ("standard", "topk", "batchtopk", "jumprelu", "matryoshka")
#: other names for the same architectures (SAELens training names).
ARCHITECTURE_ALIASES = {"relu": "standard", "matryoshka_batchtopk": "matryoshka"}
#: architectures SAELens knows that this package cannot run.
KNOWN_UNSUPPORTED = ("abstopk", "gated", "transcoder", "skip_transcoder", "jumprelu_transcoder",
                     "jumprelu_skip_transcoder", "temporal", "matching_pursuit")


class SAECompatibilityError(UserError):
    """An SAE does not fit the model/hook it is used with (wrong d_in, other model, other hook)."""


class UnsupportedArchitectureError(UserError):
    """The SAE uses an architecture this package does not implement."""


def canonical_architecture(name: Any, *, where: str = "") -> str:
    """The canonical name of ``name`` (``None`` means standard); raises :class:`UnsupportedArchitectureError`."""
    key = str(name or "standard").lower()
    key = ARCHITECTURE_ALIASES.get(key, key)
    if key in ARCHITECTURES:
        return key
    src = f" ({where})" if where else ""
    if key in KNOWN_UNSUPPORTED:
        raise UnsupportedArchitectureError(
            f"SAE architecture {key!r}{src} is not supported yet: domain-sae runs {', '.join(ARCHITECTURES)} "
            f"SAEs. Load it with SAELens instead, or train one of those.")
    raise UnsupportedArchitectureError(f"Unknown SAE architecture {key!r}{src}; supported: {', '.join(ARCHITECTURES)}.")


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


@dataclass
class SAEModelConfig:
    """What cfg.json holds about one SAE (besides SAELens bookkeeping added by :mod:`domain_sae.sae.format`).

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
    k: int = 32
    aux_k_coefficient: float = 1.0 / 32.0
    aux_k: int | None = None
    topk_threshold_lr: float = 0.01
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.001
    jumprelu_sparsity_loss: str = "tanh"
    jumprelu_tanh_scale: float = 4.0
    matryoshka_widths: list = field(default_factory=list)
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.metadata is None:
            self.metadata = {}
        if isinstance(self.dtype, torch.dtype):
            self.dtype = dtype_to_str(self.dtype)
        self.dtype = dtype_to_str(dtype_from_str(self.dtype))
        self.matryoshka_widths = [int(w) for w in (self.matryoshka_widths or [])]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["metadata"] = copy.deepcopy(dict(self.metadata))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEModelConfig":
        """Build from a dict, ignoring keys this class does not know."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
