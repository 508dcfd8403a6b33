"""Loading SAEs from wherever they are: our directories, SAELens directories (v6 nested cfg or the older flat cfg),
run directories (their ``sae/`` folder), SAELens pretrained ``RELEASE/SAE_ID``, ``hf://owner/repo/path`` and
in-memory SAELens objects. The class is picked by the cfg's architecture (:mod:`.registry`); the file format itself
is :mod:`.format` (whose names are re-exported here). An SAE whose cfg still says ``expected_average_only_in`` is
folded on load when its scale s is known (metadata ``norm_scaling_factor``, or a SAELens checkpoint's
``activation_scaler.json``). Weights are read with safetensors only; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import UserError
from .base import BaseSAE
from .format import (CFG_FILE, REQUIRED_TENSORS, SAELENS_SCALER_FILE, SPARSITY_FILE, WEIGHTS_FILE, SAEFormatError,
                     cfg_to_dict, json_default, load_sparsity, maybe_fold_known_scale, normalize_cfg_dict,
                     prepare_state, read_cfg, read_safetensors, save_sae)
from .model_config import SAEModelConfig, dtype_from_str, dtype_to_str
from ..util.hf import hub_reachable as _hub_reachable
from .registry import UnsupportedArchitectureError, get_sae_class

__all__ = ["load_sae", "load_sae_dir", "from_saelens", "save_sae", "read_cfg", "load_sparsity", "cfg_to_dict",
           "normalize_cfg_dict", "SAEFormatError", "SAESourceError", "UnsupportedArchitectureError", "CFG_FILE",
           "WEIGHTS_FILE", "SPARSITY_FILE", "REQUIRED_TENSORS"]


class SAESourceError(UserError):
    """An SAE source (release id, hub path) cannot be resolved: a package is missing or the hub is unreachable."""


def _build(cfg: SAEModelConfig, state: dict, *, where: Path, device=None, dtype=None,
           scaler_file: Optional[Path] = None) -> BaseSAE:
    state = prepare_state(cfg, state, where)
    known = set(REQUIRED_TENSORS) | {"threshold", "topk_threshold"}
    extra = sorted(set(state) - known)
    if extra:
        warnings.warn(f"{where}: ignoring unknown tensor(s) {', '.join(extra)}.", stacklevel=3)
    if dtype is not None:
        cfg.dtype = dtype_to_str(dtype_from_str(dtype))
    sae = get_sae_class(cfg.architecture, where=str(where)).from_state(cfg, state)
    maybe_fold_known_scale(sae, scaler_file)
    return sae.to(device) if device is not None else sae


def load_sae_dir(directory: Union[str, Path], *, device=None, dtype=None) -> BaseSAE:
    """Load an SAE directory (ours, SAELens 6 nested cfg, or SAELens pre-6 flat cfg)."""
    d = Path(directory)
    cfg = read_cfg(d)
    state = read_safetensors(d / WEIGHTS_FILE)
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


def from_saelens(sae_lens_sae: Any, *, source: Optional[str] = None) -> BaseSAE:
    """Convert an in-memory SAELens SAE object (standard, topk or jumprelu; a training SAE gives its training
    architecture) to one of ours."""
    cfg_obj = sae_lens_sae.cfg
    raw = cfg_obj.to_dict() if hasattr(cfg_obj, "to_dict") else dict(vars(cfg_obj))
    meta = raw.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raw["metadata"] = meta.to_dict() if hasattr(meta, "to_dict") else dict(vars(meta))
    raw["dtype"] = str(raw.get("dtype", "float32"))
    where = source or "SAELens SAE"
    cfg = normalize_cfg_dict(json.loads(json.dumps(raw, default=json_default)), where=where)
    state = {k: v.detach().to("cpu") for k, v in sae_lens_sae.state_dict().items()}
    sae = _build(cfg, state, where=Path(where))
    if source:
        sae.cfg.metadata["source_path"] = source
    return sae


def _load_release(release: str, sae_id: str, *, device=None, dtype=None) -> BaseSAE:
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


def _load_hf(spec: str, *, device=None, dtype=None) -> BaseSAE:
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


def load_sae(source: Union[str, Path], *, device=None, dtype=None) -> BaseSAE:
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
