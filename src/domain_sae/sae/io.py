"""SAELens-compatible save/load of SAEs (SPEC section 4).

On disk an SAE is a directory with

- ``cfg.json``: SAELens-6 layout. Top level: ``architecture``, ``d_in``, ``d_sae``, ``dtype``, ``device``,
  ``apply_b_dec_to_input``, ``normalize_activations``, ``reshape_activations``, plus our loss options
  (``mse_loss_normalization``, ``lp_norm``, ``scale_sparsity_penalty_by_decoder_norm``, ``normalize_sae_decoder``;
  SAELens ignores keys it does not know) and a nested ``metadata`` dict (model_name, hook_name, hook_layer,
  context_size, prepend_bos, dataset_path, training_tokens, activation_scale, lineage, sae_lens_version, ...).
- ``sae_weights.safetensors``: ``W_enc`` [d_in, d_sae], ``b_enc`` [d_sae], ``W_dec`` [d_sae, d_in], ``b_dec`` [d_in].
- ``sparsity.safetensors`` (optional): ``sparsity`` [d_sae] = log10(firing density + 1e-10).

:func:`load_sae` also reads SAELens's older flat cfg.json (``hook_point`` / ``hook_name``, ``hook_point_layer``,
``activation_fn_str``, ``activation_fn_kwargs``, ``finetuning_scaling_factor``, boolean
``normalize_activations``, ...), run directories (their ``sae/`` folder), SAELens pretrained ``RELEASE/SAE_ID``
and ``hf://owner/repo/path``. An SAE whose cfg still says ``expected_average_only_in`` is folded on load when its
scale s is known (metadata ``norm_scaling_factor``, or a SAELens checkpoint's ``activation_scaler.json``).
Weights are read with safetensors only; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..errors import UserError
from ..hf import hub_reachable as _hub_reachable
from .registry import UnsupportedArchitectureError, get_sae_class
from .standard import SAEModelConfig, StandardSAE, dtype_from_str, dtype_to_str

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

# Keys of a flat (pre-6) SAELens cfg that describe provenance and move into ``metadata``; renamed where SAELens 6
# renamed them.
_FLAT_META_RENAMES = {"hook_point": "hook_name", "hook_point_layer": "hook_layer",
                      "hook_point_head_index": "hook_head_index"}
_FLAT_META_KEYS = ("model_name", "hook_name", "hook_layer", "hook_head_index", "model_class_name",
                   "model_from_pretrained_kwargs", "context_size", "prepend_bos", "dataset_path",
                   "dataset_trust_remote_code", "exclude_special_tokens", "seqpos_slice", "neuronpedia_id",
                   "sae_lens_training_version", "sae_lens_version", "training_tokens", "activation_scale",
                   "lineage")
_LOSS_KEYS = ("mse_loss_normalization", "lp_norm", "scale_sparsity_penalty_by_decoder_norm", "normalize_sae_decoder")


class SAEFormatError(UserError):
    """An SAE directory is missing a file, or a file is corrupt / has the wrong content."""


class SAESourceError(UserError):
    """An SAE source (release id, hub path) cannot be resolved: a package is missing or the hub is unreachable."""


# ---------------------------------------------------------------------------------------------------------------
# Saving

def _json_default(o: Any) -> Any:
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


def cfg_to_dict(cfg: SAEModelConfig) -> dict[str, Any]:
    """The cfg.json content for ``cfg`` (SAELens-6 nested layout plus our loss options)."""
    meta = dict(cfg.metadata or {})
    meta.setdefault("model_name", None)
    meta.setdefault("hook_name", None)
    if meta.get("hook_layer") is None:
        meta["hook_layer"] = _hook_layer(meta.get("hook_name"))
    meta.setdefault("hook_head_index", None)
    meta.setdefault("context_size", None)
    meta.setdefault("prepend_bos", True)
    meta.setdefault("dataset_path", None)
    meta["sae_lens_version"] = SAELENS_FORMAT_VERSION  # the layout version, read by SAELens's loader
    meta.setdefault("sae_lens_training_version", None)
    meta["format"] = FORMAT_NAME
    meta["format_version"] = FORMAT_VERSION
    out: dict[str, Any] = {
        "architecture": cfg.architecture,
        "d_in": int(cfg.d_in),
        "d_sae": int(cfg.d_sae),
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": bool(cfg.apply_b_dec_to_input),
        "normalize_activations": cfg.normalize_activations,
        "reshape_activations": "none",
        "mse_loss_normalization": cfg.mse_loss_normalization,
        "lp_norm": float(cfg.lp_norm),
        "scale_sparsity_penalty_by_decoder_norm": bool(cfg.scale_sparsity_penalty_by_decoder_norm),
        "normalize_sae_decoder": bool(cfg.normalize_sae_decoder),
        "metadata": meta,
    }
    return out


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def save_sae(sae: StandardSAE, path: Union[str, Path], sparsity: Optional[torch.Tensor] = None) -> Path:
    """Write ``sae`` to directory ``path`` (created if needed): cfg.json, sae_weights.safetensors and, when
    ``sparsity`` [d_sae] is given, sparsity.safetensors. Each file is written atomically. Returns ``path``."""
    from safetensors.torch import save as st_save

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: getattr(sae, k).detach().to("cpu").contiguous().clone() for k in REQUIRED_TENSORS}
    cfg = sae.cfg
    cfg.dtype = dtype_to_str(sae.dtype)
    cfg.d_in, cfg.d_sae = int(sae.W_enc.shape[0]), int(sae.W_enc.shape[1])
    _atomic_write_bytes(path / WEIGHTS_FILE, st_save(tensors, metadata={"format": "pt"}))
    if sparsity is not None:
        sp = torch.as_tensor(sparsity).detach().to("cpu", torch.float32).reshape(-1).contiguous()
        if sp.shape[0] != cfg.d_sae:
            raise ValueError(f"sparsity has {sp.shape[0]} entries but the SAE has d_sae={cfg.d_sae}.")
        _atomic_write_bytes(path / SPARSITY_FILE, st_save({"sparsity": sp}, metadata={"format": "pt"}))
    text = json.dumps(cfg_to_dict(cfg), indent=2, default=_json_default, allow_nan=True)
    _atomic_write_bytes(path / CFG_FILE, text.encode("utf-8"))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Reading cfg.json (both SAELens styles)

def normalize_cfg_dict(raw: dict[str, Any], *, where: str = "cfg.json") -> SAEModelConfig:
    """Turn a cfg.json dict (ours, SAELens 6 nested, or SAELens pre-6 flat) into an :class:`SAEModelConfig`.

    Raises :class:`SAEFormatError` for missing/invalid fields and
    :class:`~domain_sae.sae.registry.UnsupportedArchitectureError` for architectures other than standard.
    """
    if not isinstance(raw, dict):
        raise SAEFormatError(f"{where}: expected a JSON object, got {type(raw).__name__}.")
    nested = isinstance(raw.get("metadata"), dict)
    if nested:
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
    arch = raw.get("architecture")
    if not arch:
        arch = "topk" if (act_fn == "topk" or "k" in act_kwargs) else "standard"
    get_sae_class(arch, where=where)  # raises for unsupported architectures
    if act_fn not in (None, "relu"):
        raise UnsupportedArchitectureError(
            f"{where}: activation function {act_fn!r} is not supported yet; domain-sae runs standard ReLU SAEs only.")

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

    loss = {k: raw[k] for k in _LOSS_KEYS if k in raw and raw[k] is not None}
    return SAEModelConfig(
        architecture=str(arch).lower(), d_in=d_in, d_sae=d_sae, dtype=dtype,
        # SAELens's default when the key is absent (old configs) is True.
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        normalize_activations=norm,
        mse_loss_normalization=str(loss.get("mse_loss_normalization", "none")),
        lp_norm=float(loss.get("lp_norm", 1.0)),
        scale_sparsity_penalty_by_decoder_norm=bool(loss.get("scale_sparsity_penalty_by_decoder_norm", True)),
        normalize_sae_decoder=bool(loss.get("normalize_sae_decoder", False)),
        metadata=meta,
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

def _read_safetensors(f: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    if not f.is_file():
        raise SAEFormatError(f"{f} is missing: an SAE directory needs {CFG_FILE} and {WEIGHTS_FILE}.")
    try:
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated / malformed headers
        raise SAEFormatError(f"{f} is not a readable safetensors file ({type(e).__name__}: {e}); the file is "
                             f"corrupt or truncated: re-save or re-download it.") from None


def _check_weights(state: dict[str, torch.Tensor], cfg: SAEModelConfig, f: Path) -> None:
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
    state = _read_safetensors(f)
    if "sparsity" not in state:
        raise SAEFormatError(f"{f} has no tensor 'sparsity' (found: {', '.join(sorted(state)) or 'none'}).")
    return state["sparsity"]


def _build(cfg: SAEModelConfig, state: dict[str, torch.Tensor], *, where: Path,
           device=None, dtype=None, scaler_file: Optional[Path] = None) -> StandardSAE:
    state = dict(state)
    # Old SAELens: f is multiplied by a per-latent scaling factor before decoding; fold it into W_dec's rows.
    scale = state.pop("finetuning_scaling_factor", None)
    if scale is None:
        scale = state.pop("scaling_factor", None)
    _check_weights(state, cfg, where)
    if scale is not None:
        scale = scale.reshape(-1).to(torch.float64)
        if scale.shape[0] != cfg.d_sae:
            raise SAEFormatError(f"{where}: scaling_factor has {scale.shape[0]} entries, expected d_sae={cfg.d_sae}.")
        if not torch.allclose(scale, torch.ones_like(scale)):
            state["W_dec"] = (state["W_dec"].to(torch.float64) * scale[:, None]).to(state["W_dec"].dtype)
            cfg.metadata["folded_finetuning_scaling_factor"] = True
    if "threshold" in state:
        warnings.warn(f"{where}: ignoring tensor 'threshold' (only used by jumprelu SAEs).", stacklevel=3)
    extra = sorted(set(state) - set(REQUIRED_TENSORS) - {"threshold"})
    if extra:
        warnings.warn(f"{where}: ignoring unknown tensor(s) {', '.join(extra)}.", stacklevel=3)
    if dtype is not None:
        cfg.dtype = dtype_to_str(dtype_from_str(dtype))
    cls = get_sae_class(cfg.architecture, where=str(where))
    sae = cls(cfg)
    with torch.no_grad():
        for k in REQUIRED_TENSORS:
            getattr(sae, k).copy_(state[k].to(getattr(sae, k).dtype))
    _maybe_fold_known_scale(sae, scaler_file)
    return sae.to(device) if device is not None else sae


def _scaler_file_factor(f: Optional[Path]) -> Optional[float]:
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


def _maybe_fold_known_scale(sae: StandardSAE, scaler_file: Optional[Path] = None) -> None:
    """A config that still says ``expected_average_only_in`` expects inputs scaled by s. When s is known -- metadata
    ``norm_scaling_factor``, or ``scaling_factor`` in a SAELens checkpoint's ``activation_scaler.json`` next to the
    weights -- fold it (W_enc <- s W_enc, W_dec <- W_dec / s, b_dec <- b_dec / s) so the SAE takes raw
    activations; otherwise warn."""
    if sae.cfg.normalize_activations != "expected_average_only_in":
        return
    s = (sae.cfg.metadata or {}).get("norm_scaling_factor")
    if isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s > 0:
        sae.cfg.metadata.pop("norm_scaling_factor", None)
        sae.fold_activation_scale(float(s))
        return
    s = _scaler_file_factor(scaler_file)
    if s is not None:
        sae.fold_activation_scale(s)
        sae.cfg.metadata["folded_scale_from"] = str(scaler_file)
        return
    warnings.warn("This SAE was trained on scaled activations (normalize_activations=expected_average_only_in) and "
                  "its scale was not folded into the weights: feed it x * sqrt(d_in) / E||x||, or fold the scale "
                  "with sae.fold_activation_scale(s).", stacklevel=4)


def load_sae_dir(directory: Union[str, Path], *, device=None, dtype=None) -> StandardSAE:
    """Load an SAE directory (ours, SAELens 6 nested cfg, or SAELens pre-6 flat cfg)."""
    d = Path(directory)
    cfg = read_cfg(d)
    state = _read_safetensors(d / WEIGHTS_FILE)
    sae = _build(cfg, state, where=d / WEIGHTS_FILE, device=device, dtype=dtype, scaler_file=d / SAELENS_SCALER_FILE)
    sae.cfg.metadata["source_path"] = str(d.resolve())
    return sae


# ---------------------------------------------------------------------------------------------------------------
# Sources: directories, run directories, SAELens releases, hub paths

def _resolve_dir(p: Path) -> Optional[Path]:
    """The SAE directory for a path: itself, a run directory's ``sae/`` folder, or None."""
    if (p / CFG_FILE).is_file() or (p / WEIGHTS_FILE).is_file():
        return p
    if (p / "sae" / CFG_FILE).is_file():
        return p / "sae"
    return None


def _looks_like_path(s: str) -> bool:
    """True for strings that can only be a filesystem path (not a SAELens ``RELEASE/SAE_ID``)."""
    return (s.startswith((".", "/", "~", "\\")) or (os.sep != "/" and os.sep in s)
            or bool(re.match(r"^[A-Za-z]:", s)) or s.endswith((".json", ".safetensors")))


def from_saelens(sae_lens_sae: Any, *, source: Optional[str] = None) -> StandardSAE:
    """Convert an in-memory SAELens SAE object (architecture standard) to a :class:`StandardSAE`."""
    cfg_obj = sae_lens_sae.cfg
    raw = cfg_obj.to_dict() if hasattr(cfg_obj, "to_dict") else dict(vars(cfg_obj))
    meta = raw.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raw["metadata"] = meta.to_dict() if hasattr(meta, "to_dict") else dict(vars(meta))
    raw["dtype"] = str(raw.get("dtype", "float32"))
    where = source or "SAELens SAE"
    cfg = normalize_cfg_dict(json.loads(json.dumps(raw, default=_json_default)), where=where)
    state = {k: v.detach().to("cpu") for k, v in sae_lens_sae.state_dict().items()}
    sae = _build(cfg, state, where=Path(where))
    if source:
        sae.cfg.metadata["source_path"] = source
    return sae


def _load_release(release: str, sae_id: str, *, device=None, dtype=None) -> StandardSAE:
    source = f"{release}/{sae_id}"
    try:
        from sae_lens import SAE
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    except ImportError:
        raise SAESourceError(
            f"{source!r} is not a local directory, and loading SAELens releases needs the sae-lens package: "
            f"pip install -c constraints.txt 'sae-lens>=6,<7' (or download the SAE directory and pass its path)."
        ) from None
    directory = get_pretrained_saes_directory()
    if release not in directory:
        some = ", ".join(sorted(directory)[:8])
        raise SAESourceError(f"{source!r}: no local directory of that name and no SAELens release {release!r} "
                             f"(known releases include {some}, ...).")
    lookup = directory[release]
    saes_map = getattr(lookup, "saes_map", {}) or {}
    if sae_id not in saes_map:
        some = ", ".join(sorted(saes_map)[:8])
        raise SAESourceError(f"SAELens release {release!r} has no SAE {sae_id!r} (ids include {some}, ...).")
    repo_id, folder = getattr(lookup, "repo_id", ""), saes_map[sae_id]
    if not _cached(repo_id, f"{folder}/{CFG_FILE}") and not _hub_reachable():
        raise SAESourceError(f"{source!r} is not in the local Hugging Face cache and the hub is unreachable "
                             f"(offline or HF_HUB_OFFLINE set). Connect to the internet once, or pass a local SAE "
                             f"directory.")
    try:
        out = SAE.from_pretrained(release, sae_id, device="cpu")
    except Exception as e:
        raise SAESourceError(f"SAELens could not load {source!r}: {type(e).__name__}: {e}") from None
    sae_obj = out[0] if isinstance(out, tuple) else out
    sae = from_saelens(sae_obj, source=source)
    if dtype is not None:
        sae = sae.to(dtype_from_str(dtype))
    return sae.to(device) if device is not None else sae


def _cached(repo_id: str, filename: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except Exception:
        return False


def _load_hf(spec: str, *, device=None, dtype=None) -> StandardSAE:
    rest = spec[len("hf://"):].strip("/")
    parts = rest.split("/")
    if len(parts) < 2:
        raise SAESourceError(f"{spec!r}: expected hf://OWNER/REPO[/PATH/TO/SAE_DIR].")
    repo_id, sub = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise SAESourceError(f"Loading {spec!r} needs huggingface_hub: pip install -c constraints.txt "
                             f"huggingface_hub.") from None
    prefix = f"{sub}/" if sub else ""
    online = None
    paths: dict[str, Optional[str]] = {}
    for name in (CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE):
        fname = prefix + name
        try:
            paths[name] = hf_hub_download(repo_id, fname, local_files_only=True)
            continue
        except Exception:
            pass
        if online is None:
            online = _hub_reachable()
        if not online:
            if name == SPARSITY_FILE:
                paths[name] = None
                continue
            raise SAESourceError(f"{spec}: {fname} is not in the local Hugging Face cache and the hub is "
                                 f"unreachable (offline or HF_HUB_OFFLINE set). Connect once, or download the "
                                 f"directory and pass its path.")
        try:
            paths[name] = hf_hub_download(repo_id, fname, etag_timeout=10)
        except Exception as e:
            if name == SPARSITY_FILE:
                paths[name] = None
                continue
            raise SAESourceError(f"{spec}: could not download {fname} from {repo_id} ({type(e).__name__}: {e}).") \
                from None
    d = Path(paths[CFG_FILE]).parent
    if Path(paths[WEIGHTS_FILE]).parent != d:
        raise SAEFormatError(f"{spec}: cfg.json and weights resolved to different folders.")
    sae = load_sae_dir(d, device=device, dtype=dtype)
    sae.cfg.metadata["source_path"] = spec
    return sae


def load_sae(source: Union[str, Path], *, device=None, dtype=None) -> StandardSAE:
    """Load an SAE from ``source``:

    - a directory written by us or by SAELens (v6 nested cfg or the older flat cfg);
    - a run directory (its ``sae/`` subfolder);
    - ``hf://OWNER/REPO/PATH``: a SAELens-format folder in a Hugging Face repository (cached or downloaded);
    - ``RELEASE/SAE_ID``: a SAELens pretrained release (needs the sae-lens package).

    Sets ``metadata["source_path"]``. Raises :class:`SAEFormatError` (missing/corrupt files, wrong shapes),
    :class:`SAESourceError` (unresolvable source) or ``UnsupportedArchitectureError``.
    """
    s = str(source)
    if s.startswith("hf://"):
        return _load_hf(s, device=device, dtype=dtype)
    p = Path(s).expanduser()
    if p.exists():
        if p.is_file():
            if p.name in (CFG_FILE, WEIGHTS_FILE):
                p = p.parent
            else:
                raise SAEFormatError(f"{p} is a file; pass the SAE directory holding {CFG_FILE} and {WEIGHTS_FILE}.")
        d = _resolve_dir(p)
        if d is None:
            raise SAEFormatError(f"{p} is not an SAE directory: {p / CFG_FILE} is missing (and there is no run "
                                 f"folder {p / 'sae' / CFG_FILE}).")
        return load_sae_dir(d, device=device, dtype=dtype)
    if _looks_like_path(s) or "/" not in s:
        raise SAEFormatError(f"SAE directory {s!r} does not exist. Pass an SAE directory, a run directory, "
                             f"hf://OWNER/REPO/PATH or a SAELens RELEASE/SAE_ID.")
    release, sae_id = s.split("/", 1)
    return _load_release(release, sae_id, device=device, dtype=dtype)
