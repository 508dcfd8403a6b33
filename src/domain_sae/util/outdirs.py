"""One rule for every directory domain-sae writes: never replace or write into a directory that is not ours.

Every writer (run directories, ``dsae eval --out``, ``dsae compare --out``, activation caches, future feature
stores) calls :func:`prepare_output_dir` (or :func:`check_output_dir` first, to refuse before expensive work):

    absent                      -> created (parents too), marker written
    a file, or below a file     -> refused (choose a directory path)
    empty directory             -> used, marker written
    ours, same kind             -> kept as it is (the writer replaces its own files), or emptied with overwrite
    ours, another kind          -> refused (a cache is never replaced by a run, ...)
    anything else, non-empty    -> refused, with or without overwrite: nothing of the user's is ever deleted

"Ours" means the directory holds :data:`MARKER` (``.domain-sae.json``, ``{"kind": ...}``) or, for directories
written before the marker existed, the kind's own identifying file (:data:`RECOGNISED`).
"""

from __future__ import annotations

import json
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from ..errors import UserError
from .atomic import atomic_directory
from .jsonsafe import write_json

MARKER = ".domain-sae.json"
# (file, JSON key, value prefix) that identify a directory of each kind written before the marker existed
# (key None: the file's presence is enough).
RECOGNISED = {"run": ("training_config.json", None, ""), "eval": ("eval.json", "format", "domain-sae-eval"),
              "study": ("results.json", "schema", "domain-sae/study-results"),
              "activation-cache": ("manifest.json", "format", "domain-sae-activation-cache")}
DESCRIPTIONS = {"run": "training run", "eval": "evaluation output", "study": "study output",
                "activation-cache": "activation cache", "neuronpedia-export": "Neuronpedia export",
                "saebench-export": "SAEBench export"}

_UNSAFE = re.compile(r'[/\\<>:"|?*\x00-\x1f\x7f]')


class OutputDirError(UserError):
    """An output location that cannot be used without risking the user's files."""


def safe_component(name: object, option: str) -> str:
    """``name`` if it is one safe path component (no separators, not '.'/'..', no control or reserved characters,
    at most 200 characters); else :class:`OutputDirError` naming ``option``."""
    s = name if isinstance(name, str) else None
    if s is None or not s.strip() or s in (".", "..") or s != s.strip() or len(s) > 200 or _UNSAFE.search(s):
        raise OutputDirError(
            f"{option} {name!r} cannot be used as a directory name: it must be a single path component (no '/' or "
            f"'\\', not '.' or '..', no leading/trailing spaces, control or <>:\"|?* characters, at most 200 "
            f"characters). Use a plain name such as 'chat_run1'; put the parent folder in the output directory "
            f"option instead.")
    return s


def _describe(kind: str) -> str:
    return DESCRIPTIONS.get(kind, kind)


def output_kind(path: str | Path) -> Optional[str]:
    """The kind of domain-sae output ``path`` holds (from its marker or a recognised file), else None."""
    p = Path(path)
    marker = p / MARKER
    if marker.is_file():
        try:
            kind = json.loads(marker.read_text()).get("kind")
            if isinstance(kind, str):
                return kind
        except (ValueError, OSError, AttributeError):
            pass
    for kind, (name, key, prefix) in RECOGNISED.items():
        f = p / name
        if not f.is_file():
            continue
        if key is None:
            return kind
        try:
            value = json.loads(f.read_text()).get(key)
        except (ValueError, OSError, AttributeError):
            continue
        if isinstance(value, str) and value.startswith(prefix):
            return kind
    return None


def _first_file_ancestor(path: Path) -> Optional[Path]:
    for parent in [path, *path.parents]:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def check_not_file(path: str | Path, option: str = "--out") -> Path:
    """``OutputDirError`` when ``path`` or one of its parents is a file (a directory can never be made there)."""
    p = Path(path)
    blocker = _first_file_ancestor(p)
    if blocker is not None:
        where = "is a file" if blocker == p else f"lies below {blocker}, which is a file"
        raise OutputDirError(f"The output location {p} ({option}) {where}, not a directory; domain-sae writes a "
                             f"directory there. Choose a directory path (an existing folder or a new name).")
    return p


def check_output_dir(path: str | Path, kind: str, *, overwrite: bool = False, option: str = "--out") -> str:
    """Refuse (``OutputDirError``) an output location that is unusable or not ours; create nothing.

    Returns ``"absent"``, ``"empty"`` or ``"ours"`` (a non-empty directory holding this ``kind``)."""
    p = check_not_file(path, option)
    if not p.exists():
        return "absent"
    if not any(p.iterdir()):
        return "empty"
    found = output_kind(p)
    if found == kind:
        return "ours"
    if found is not None:
        raise OutputDirError(f"The output directory {p} ({option}) holds a domain-sae {_describe(found)}, not a "
                             f"{_describe(kind)}; it is left untouched. Choose another directory for the "
                             f"{_describe(kind)}.")
    replace = (" --overwrite only replaces a directory that holds a domain-sae " + _describe(kind) + " (marked by "
               + MARKER + "), so it does not apply here." if overwrite else "")
    raise OutputDirError(f"The output directory {p} ({option}) is not empty and does not hold a domain-sae "
                         f"{_describe(kind)}, so nothing is written there (its files are left as they are).{replace} "
                         f"Choose a new or empty directory.")


def write_marker(path: str | Path, kind: str) -> Path:
    """Write the marker that identifies ``path`` as a domain-sae output of ``kind``."""
    p = Path(path) / MARKER
    return write_json(p, {"kind": kind, "format": "domain-sae-output", "version": 1}, indent=None)


def prepare_output_dir(path: str | Path, kind: str, *, overwrite: bool = False, option: str = "--out") -> Path:
    """Check ``path`` (:func:`check_output_dir`), empty it when it holds this ``kind`` and ``overwrite`` is set,
    create it and write the marker. Returns the path."""
    p = Path(path)
    state = check_output_dir(p, kind, overwrite=overwrite, option=option)
    if state == "ours" and overwrite:
        shutil.rmtree(p)
    p.mkdir(parents=True, exist_ok=True)
    write_marker(p, kind)
    return p


@contextmanager
def new_output_dir(path: str | Path, kind: str, *, overwrite: bool = False, option: str = "OUT") -> Iterator[Path]:
    """Write a whole output directory of ``kind`` at once: refuse what :func:`check_output_dir` refuses, and an
    earlier output of this kind unless ``overwrite``; yield a temporary directory (marker already written) that
    replaces ``path`` when the block ends without an exception (:func:`~.atomic.atomic_directory`), so ``path``
    is never left half written."""
    if check_output_dir(path, kind, overwrite=overwrite, option=option) == "ours" and not overwrite:
        raise OutputDirError(f"{path} ({option}) already holds a domain-sae {_describe(kind)}; pass --overwrite to "
                             f"replace it, or choose another directory.")
    with atomic_directory(path) as tmp:
        write_marker(tmp, kind)
        yield tmp
