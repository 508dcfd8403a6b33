"""The on-disk SAE format (SPEC section 4): cfg.json <-> :class:`SAEModelConfig`, the safetensors files, and the
checks and folds applied to weights read from disk. Works on any SAE through the :class:`~.base.SAE` contract, so
it imports no architecture.

A directory holds

- ``cfg.json``: SAELens-6 layout. Top level: ``architecture``, ``d_in``, ``d_sae``, ``dtype``, ``device``,
  ``apply_b_dec_to_input``, ``normalize_activations``, ``reshape_activations``, our loss options
  (``mse_loss_normalization``, ``lp_norm``, ``scale_sparsity_penalty_by_decoder_norm``, ``normalize_sae_decoder``;
  SAELens ignores keys it does not know), the architecture's own fields (topk: ``k``,
  ``rescale_acts_by_decoder_norm: false``, ``aux_k_coefficient``; jumprelu: ``jumprelu_*``) and a nested
  ``metadata`` dict (model_name, hook_name, hook_layer, context_size, prepend_bos, dataset_path, training_tokens,
  activation_scale, lineage, sae_lens_version, and for SAEs exported as another architecture
  ``training_architecture`` + ``training_architecture_details``, as SAELens writes them).
- ``sae_weights.safetensors``: ``W_enc`` [d_in, d_sae], ``b_enc`` [d_sae], ``W_dec`` [d_sae, d_in], ``b_dec`` [d_in],
  plus ``threshold`` [d_sae] for jumprelu.
- ``sparsity.safetensors`` (optional): ``sparsity`` [d_sae] = log10(firing density + 1e-10).

Reading also accepts SAELens's older flat cfg.json (``hook_point`` / ``hook_name``, ``hook_point_layer``,
``activation_fn_str``, ``activation_fn_kwargs.k``, ``finetuning_scaling_factor``, boolean
``normalize_activations``, ...). Weights are read with safetensors only; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..errors import UserError
from ..util.atomic import atomic_write_bytes
from .model_config import (SAEModelConfig, UnsupportedArchitectureError, canonical_architecture, dtype_from_str,
                           dtype_to_str)

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
#: written by SAELens >= 6 next to an intermediate (not yet folded) checkpoint: {"scaling_factor": s, ...}.
SAELENS_SCALER_FILE = "activation_scaler.json"
FORMAT_NAME = "domain_sae"
FORMAT_VERSION = 1
#: written as metadata.sae_lens_version so that SAELens >= 6 reads the nested layout as-is.
SAELENS_FORMAT_VERSION = "6.0.0"
REQUIRED_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")

_FLAT_META_RENAMES = {"hook_point": "hook_name", "hook_point_layer": "hook_layer",
                      "hook_point_head_index": "hook_head_index"}
_FLAT_META_KEYS = ("model_name", "hook_name", "hook_layer", "hook_head_index", "model_class_name",
                   "model_from_pretrained_kwargs", "context_size", "prepend_bos", "dataset_path",
                   "dataset_trust_remote_code", "exclude_special_tokens", "seqpos_slice", "neuronpedia_id",
                   "sae_lens_training_version", "sae_lens_version", "training_tokens", "activation_scale",
                   "lineage")
_LOSS_KEYS = ("mse_loss_normalization", "lp_norm", "scale_sparsity_penalty_by_decoder_norm", "normalize_sae_decoder")
#: cfg.json keys of each architecture's own fields (written top level, read back; SAELens reads ``k``).
ARCH_KEYS = {"standard": (), "jumprelu": ("jumprelu_bandwidth", "jumprelu_init_threshold", "jumprelu_sparsity_loss",
                                          "jumprelu_tanh_scale"),
             "topk": ("k", "aux_k_coefficient", "aux_k"),
             "batchtopk": ("k", "aux_k_coefficient", "aux_k", "topk_threshold_lr"),
             "matryoshka": ("k", "aux_k_coefficient", "aux_k", "topk_threshold_lr", "matryoshka_widths")}
_SAELENS_DETAIL_RENAMES = {"jumprelu_sparsity_loss_mode": "jumprelu_sparsity_loss"}


class SAEFormatError(UserError):
    """An SAE directory is missing a file, or a file is corrupt / has the wrong content."""


# ---------------------------------------------------------------------------------------------------------------
# Saving

def json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.item() if o.numel() == 1 else o.tolist()
    if isinstance(o, torch.dtype):
        return dtype_to_str(o)
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def _hook_layer(hook_name: Optional[str]) -> Optional[int]:
    m = re.search(r"(?:blocks|layers|h|layer)\.(\d+)\b", str(hook_name or ""))
    return int(m.group(1)) if m else None


def cfg_to_dict(cfg: SAEModelConfig, *, architecture: Optional[str] = None,
                training_architecture: Optional[str] = None) -> dict[str, Any]:
    """The cfg.json content for ``cfg`` (SAELens-6 nested layout plus our loss and architecture options).

    ``architecture`` overrides the written architecture (batchtopk/matryoshka are written as ``jumprelu``); the
    trained one then goes to ``metadata.training_architecture`` with its fields in
    ``metadata.training_architecture_details``."""
    meta = dict(cfg.metadata or {})
    for k, default in (("model_name", None), ("hook_name", None), ("hook_head_index", None),
                       ("context_size", None), ("prepend_bos", True), ("dataset_path", None),
                       ("sae_lens_training_version", None)):
        meta.setdefault(k, default)
    if meta.get("hook_layer") is None:
        meta["hook_layer"] = _hook_layer(meta.get("hook_name"))
    meta["sae_lens_version"] = SAELENS_FORMAT_VERSION  # the layout version, read by SAELens's loader
    meta["format"] = FORMAT_NAME
    meta["format_version"] = FORMAT_VERSION
    arch = architecture or cfg.architecture
    trained = training_architecture or cfg.architecture
    if trained != arch:
        meta["training_architecture"] = trained
        meta["training_architecture_details"] = {k: getattr(cfg, k) for k in ARCH_KEYS[trained]}
    out: dict[str, Any] = {
        "architecture": arch, "d_in": int(cfg.d_in), "d_sae": int(cfg.d_sae), "dtype": cfg.dtype, "device": "cpu",
        "apply_b_dec_to_input": bool(cfg.apply_b_dec_to_input), "normalize_activations": cfg.normalize_activations,
        "reshape_activations": "none", "mse_loss_normalization": cfg.mse_loss_normalization,
        "lp_norm": float(cfg.lp_norm),
        "scale_sparsity_penalty_by_decoder_norm": bool(cfg.scale_sparsity_penalty_by_decoder_norm),
        "normalize_sae_decoder": bool(cfg.normalize_sae_decoder),
    }
    out.update({k: getattr(cfg, k) for k in ARCH_KEYS[arch]})
    if arch == "topk":
        out["rescale_acts_by_decoder_norm"] = False  # SAELens: select on z itself, as we do
    out["metadata"] = meta
    return out


def save_sae(sae, path: Union[str, Path], sparsity: Optional[torch.Tensor] = None) -> Path:
    """Write ``sae`` (any :class:`~.base.SAE`) to directory ``path`` (created if needed): cfg.json,
    sae_weights.safetensors and, when ``sparsity`` [d_sae] is given, sparsity.safetensors. Each file is written
    atomically. The architecture and tensors written are ``sae.export_state()``. Returns ``path``."""
    from safetensors.torch import save as st_save

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    arch, tensors = sae.export_state()
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    cfg = sae.cfg
    cfg.dtype = dtype_to_str(sae.dtype)
    cfg.d_in, cfg.d_sae = int(sae.W_enc.shape[0]), int(sae.W_enc.shape[1])
    atomic_write_bytes(path / WEIGHTS_FILE, st_save(tensors, metadata={"format": "pt"}))
    if sparsity is not None:
        sp = torch.as_tensor(sparsity).detach().to("cpu", torch.float32).reshape(-1).contiguous()
        if sp.shape[0] != cfg.d_sae:
            raise ValueError(f"sparsity has {sp.shape[0]} entries but the SAE has d_sae={cfg.d_sae}.")
        atomic_write_bytes(path / SPARSITY_FILE, st_save({"sparsity": sp}, metadata={"format": "pt"}))
    text = json.dumps(cfg_to_dict(cfg, architecture=arch), indent=2, default=json_default, allow_nan=True)
    atomic_write_bytes(path / CFG_FILE, text.encode("utf-8"))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Reading cfg.json (both SAELens styles)

def _architecture_fields(raw: dict, meta: dict, arch: str, act_kwargs: dict) -> dict[str, Any]:
    """The architecture's own fields: top level (ours), else SAELens's activation_fn_kwargs / training details."""
    details = {_SAELENS_DETAIL_RENAMES.get(k, k): v for k, v in (meta.get("training_architecture_details") or {}
                                                                  ).items()}
    out: dict[str, Any] = {}
    for key in ARCH_KEYS[arch]:
        for src in (raw, act_kwargs if key == "k" else {}, details):
            if src.get(key) is not None:
                out[key] = src[key]
                break
    if "k" in out:
        out["k"] = int(round(float(out["k"])))
    if out.get("jumprelu_sparsity_loss") not in (None, "tanh", "step"):
        out.pop("jumprelu_sparsity_loss")
    return out


def normalize_cfg_dict(raw: dict[str, Any], *, where: str = "cfg.json") -> SAEModelConfig:
    """Turn a cfg.json dict (ours, SAELens 6 nested, or SAELens pre-6 flat) into an :class:`SAEModelConfig`.

    Raises :class:`SAEFormatError` for missing/invalid fields and ``UnsupportedArchitectureError`` for
    architectures this package does not run. A topk cfg with ``rescale_acts_by_decoder_norm: true`` is marked in
    ``metadata["rescale_acts_by_decoder_norm"]`` so that the loader folds the decoder norms (exactly)."""
    if not isinstance(raw, dict):
        raise SAEFormatError(f"{where}: expected a JSON object, got {type(raw).__name__}.")
    if isinstance(raw.get("metadata"), dict):
        meta = dict(raw["metadata"])
    else:
        meta = {}
        for k, v in raw.items():
            key = _FLAT_META_RENAMES.get(k, k)
            if key in _FLAT_META_KEYS and meta.get(key) is None:
                meta[key] = v
    for k in ("format", "format_version"):
        meta.pop(k, None)

    act_fn = raw.get("activation_fn", raw.get("activation_fn_str"))
    act_kwargs = raw.get("activation_fn_kwargs") or {}
    arch = raw.get("architecture") or ("topk" if (act_fn == "topk" or "k" in act_kwargs) else "standard")
    arch = canonical_architecture(arch, where=where)
    if act_fn not in (None, "relu", "topk") or (act_fn == "topk" and arch != "topk"):
        raise UnsupportedArchitectureError(
            f"{where}: activation function {act_fn!r} with architecture {arch!r} is not supported yet.")

    missing = [k for k in ("d_in", "d_sae") if raw.get(k) is None]
    if missing:
        raise SAEFormatError(f"{where}: missing required field(s) {', '.join(missing)}.")
    try:
        d_in, d_sae = int(raw["d_in"]), int(raw["d_sae"])
    except (TypeError, ValueError):
        raise SAEFormatError(f"{where}: d_in and d_sae must be integers (got {raw['d_in']!r}, {raw['d_sae']!r}).")
    if d_in <= 0 or d_sae <= 0:
        raise SAEFormatError(f"{where}: d_in and d_sae must be positive (got {d_in}, {d_sae}).")
    try:
        dtype = dtype_to_str(dtype_from_str(raw.get("dtype") or "float32"))
    except ValueError as e:
        raise SAEFormatError(f"{where}: {e}") from None

    norm = raw.get("normalize_activations", "none")
    if isinstance(norm, bool):  # very old SAELens: True meant the "expected average" scaling
        norm = "expected_average_only_in" if norm else "none"
    norm = norm or "none"
    if norm not in ("none", "expected_average_only_in"):
        raise SAEFormatError(
            f"{where}: normalize_activations={norm!r} is not supported yet (only 'none' and "
            f"'expected_average_only_in'). Load it with SAELens instead.")
    if raw.get("reshape_activations") == "hook_z":
        meta["reshape_activations"] = "hook_z"
    if arch == "topk" and raw.get("rescale_acts_by_decoder_norm"):
        meta["rescale_acts_by_decoder_norm"] = True

    loss = {k: raw[k] for k in _LOSS_KEYS if k in raw and raw[k] is not None}
    return SAEModelConfig(
        architecture=arch, d_in=d_in, d_sae=d_sae, dtype=dtype,
        # SAELens's default when the key is absent (old configs) is True.
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        normalize_activations=norm,
        mse_loss_normalization=str(loss.get("mse_loss_normalization", "none")),
        lp_norm=float(loss.get("lp_norm", 1.0)),
        scale_sparsity_penalty_by_decoder_norm=bool(loss.get("scale_sparsity_penalty_by_decoder_norm", True)),
        normalize_sae_decoder=bool(loss.get("normalize_sae_decoder", False)),
        metadata=meta, **_architecture_fields(raw, meta, arch, act_kwargs),
    )


def read_cfg(directory: Union[str, Path]) -> SAEModelConfig:
    """Parse ``directory/cfg.json`` (either SAELens style) into an :class:`SAEModelConfig`."""
    f = Path(directory) / CFG_FILE
    if not f.is_file():
        raise SAEFormatError(f"{f} is missing: an SAE directory needs {CFG_FILE} and {WEIGHTS_FILE}.")
    try:
        raw = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SAEFormatError(f"{f} is not valid JSON ({e}); re-save the SAE or restore the file.") from None
    return normalize_cfg_dict(raw, where=str(f))


# ---------------------------------------------------------------------------------------------------------------
# Reading weights

def read_safetensors(f: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    if not f.is_file():
        raise SAEFormatError(f"{f} is missing: an SAE directory needs {CFG_FILE} and {WEIGHTS_FILE}.")
    try:
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated / malformed headers
        raise SAEFormatError(f"{f} is not a readable safetensors file ({type(e).__name__}: {e}); the file is "
                             f"corrupt or truncated: re-save or re-download it.") from None


def check_weights(state: dict[str, torch.Tensor], cfg: SAEModelConfig, f: Path) -> None:
    """Raise :class:`SAEFormatError` unless the four required tensors have cfg's shapes, float dtypes and finite
    values."""
    missing = [k for k in REQUIRED_TENSORS if k not in state]
    if missing:
        raise SAEFormatError(f"{f} lacks tensor(s) {', '.join(missing)} (found: {', '.join(sorted(state)) or 'none'}).")
    want = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.d_in),
            "b_dec": (cfg.d_in,)}
    for k, shape in want.items():
        if tuple(state[k].shape) != shape:
            raise SAEFormatError(f"{f}: tensor {k} has shape {tuple(state[k].shape)}, but cfg.json (d_in={cfg.d_in}, "
                                 f"d_sae={cfg.d_sae}) requires {shape}.")
        if not state[k].is_floating_point():
            raise SAEFormatError(f"{f}: tensor {k} has dtype {state[k].dtype}; expected a floating-point type.")
        if not bool(torch.isfinite(state[k]).all()):
            raise SAEFormatError(f"{f}: tensor {k} contains NaN or infinite values; the SAE is corrupt.")


def load_sparsity(directory: Union[str, Path]) -> Optional[torch.Tensor]:
    """``sparsity`` [d_sae] from ``directory/sparsity.safetensors`` (log10 firing densities), or None if absent."""
    f = Path(directory) / SPARSITY_FILE
    if not f.exists():
        return None
    state = read_safetensors(f)
    if "sparsity" not in state:
        raise SAEFormatError(f"{f} has no tensor 'sparsity' (found: {', '.join(sorted(state)) or 'none'}).")
    return state["sparsity"]


def prepare_state(cfg: SAEModelConfig, state: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """Checked weights in our conventions: old SAELens's per-latent ``(finetuning_)scaling_factor`` folded into
    W_dec's rows, ``log_threshold`` turned into ``threshold`` = exp(log_threshold), and (topk with
    ``rescale_acts_by_decoder_norm``) the decoder norms n folded: b_enc <- n b_enc, W_enc <- W_enc n,
    W_dec <- W_dec / n (exact: SAELens selects and decodes with z n and f / n)."""
    state = dict(state)
    scale = state.pop("finetuning_scaling_factor", None)
    if scale is None:
        scale = state.pop("scaling_factor", None)
    if "log_threshold" in state and "threshold" not in state:
        state["threshold"] = torch.exp(state.pop("log_threshold"))
    check_weights(state, cfg, where)
    if scale is not None:
        scale = scale.reshape(-1).to(torch.float64)
        if scale.shape[0] != cfg.d_sae:
            raise SAEFormatError(f"{where}: scaling_factor has {scale.shape[0]} entries, expected d_sae={cfg.d_sae}.")
        if not torch.allclose(scale, torch.ones_like(scale)):
            state["W_dec"] = (state["W_dec"].to(torch.float64) * scale[:, None]).to(state["W_dec"].dtype)
            cfg.metadata["folded_finetuning_scaling_factor"] = True
    if cfg.metadata.pop("rescale_acts_by_decoder_norm", False):
        n = state["W_dec"].to(torch.float64).norm(dim=-1)
        dt = state["W_dec"].dtype
        state["b_enc"] = (state["b_enc"].to(torch.float64) * n).to(dt)
        state["W_enc"] = (state["W_enc"].to(torch.float64) * n[None, :]).to(dt)
        state["W_dec"] = (state["W_dec"].to(torch.float64) / n[:, None]).to(dt)
        cfg.metadata["folded_decoder_norms"] = True
    if "threshold" in state:
        t = state["threshold"]
        if tuple(t.shape) != (cfg.d_sae,) or not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise SAEFormatError(f"{where}: tensor threshold must hold d_sae={cfg.d_sae} finite values >= 0.")
    return state


def scaler_file_factor(f: Optional[Path]) -> Optional[float]:
    """``scaling_factor`` from a SAELens ``activation_scaler.json`` (None when absent, null or not a number)."""
    if f is None or not f.is_file():
        return None
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SAEFormatError(f"{f} is not valid JSON ({e}); delete it if the SAE is already folded.") from None
    s = data.get("scaling_factor") if isinstance(data, dict) else None
    if s is None:
        return None
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
        raise SAEFormatError(f"{f}: scaling_factor must be a positive number, got {s!r}.")
    return float(s)


def maybe_fold_known_scale(sae, scaler_file: Optional[Path] = None) -> None:
    """A config that still says ``expected_average_only_in`` expects inputs scaled by s. When s is known -- metadata
    ``norm_scaling_factor``, or ``scaling_factor`` in a SAELens checkpoint's ``activation_scaler.json`` next to the
    weights -- fold it (``sae.fold_activation_scale(s)``) so the SAE takes raw activations; otherwise warn."""
    if sae.cfg.normalize_activations != "expected_average_only_in":
        return
    s = (sae.cfg.metadata or {}).get("norm_scaling_factor")
    if isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s > 0:
        sae.cfg.metadata.pop("norm_scaling_factor", None)
        sae.fold_activation_scale(float(s))
        return
    s = scaler_file_factor(scaler_file)
    if s is not None:
        sae.fold_activation_scale(s)
        sae.cfg.metadata["folded_scale_from"] = str(scaler_file)
        return
    warnings.warn("This SAE was trained on scaled activations (normalize_activations=expected_average_only_in) and "
                  "its scale was not folded into the weights: feed it x * sqrt(d_in) / E||x||, or fold the scale "
                  "with sae.fold_activation_scale(s).", stacklevel=4)
