"""JSON-safe values: the one sanitiser every JSON writer of the package uses (eval.json, results.json, metrics.jsonl,
SAE cfg.json).

    jsonable(obj) = a copy of ``obj`` that :func:`json.dumps` accepts with ``allow_nan=False``:
        dict keys -> str; list/tuple -> list; tensors, numpy arrays and scalars -> ``.tolist()``;
        non-finite floats -> ``None`` (``null``), or with ``clamp_inf`` +-inf -> +-1e308 (NaN still ``null``);
        Path and anything else -> ``str``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


INF_AS = 1e308  # what +-inf becomes with clamp_inf (a float JSON readers keep as a huge number)


def jsonable(obj: Any, *, clamp_inf: bool = False) -> Any:
    """A JSON-safe copy: tensors/arrays to lists, non-finite floats to None, Paths to str, tuples to lists."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v, clamp_inf=clamp_inf) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, clamp_inf=clamp_inf) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return INF_AS if clamp_inf and obj > 0 else -INF_AS if clamp_inf and obj < 0 else None
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # third-party arrays: torch tensors, numpy arrays and scalars
        return jsonable(obj.tolist(), clamp_inf=clamp_inf)
    return str(obj)


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2, clamp_inf: bool = False) -> Path:
    """Write ``json.dumps(jsonable(obj), indent=indent, allow_nan=False)`` plus a newline to ``path``, atomically
    (:func:`domain_sae.util.atomic.atomic_write_text`): strict JSON that every reader accepts, never half a file."""
    from .atomic import atomic_write_text
    atomic_write_text(path, json.dumps(jsonable(obj, clamp_inf=clamp_inf), indent=indent, allow_nan=False) + "\n")
    return Path(path)
