"""Reading options: ConfigError, finiteness checks, type coercion, YAML/TOML loading, CLI generation and the
generated option reference. Generic over any option dataclass (the classes themselves live in :mod:`.config`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, get_args, get_origin

from ..errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem the user can fix; the message names the option and the fix."""


def check_finite_floats(cfg) -> None:
    """ConfigError for any float option (or float in a list option) of ``cfg`` that is inf or nan."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"Option '{f.name}' is {v}; it must be a finite number (not inf or nan).")


# ------------------------------------------------------------------------------------------------------------------
# Generic machinery: file loading, type checking, CLI generation.

def _field_map(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _alias_map(cls) -> dict[str, str]:
    out = {}
    for f in dataclasses.fields(cls):
        for a in f.metadata.get("aliases", ()):
            out[a] = f.name
    return out


def _strip_optional(tp):
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _type_name(tp) -> str:
    base, optional = _strip_optional(tp)
    if get_origin(base) is Literal:
        s = "one of " + ", ".join(repr(a) for a in get_args(base))
    elif get_origin(base) is list:
        s = f"list of {_type_name(get_args(base)[0])} (comma-separated on the command line)"
    else:
        s = getattr(base, "__name__", str(base))
    return s + (" or null" if optional else "")


def coerce(name: str, tp, value):
    """Convert ``value`` (from YAML or a CLI string) to the field type, or raise ConfigError naming the field."""
    base, optional = _strip_optional(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ConfigError(f"Option '{name}' cannot be null; expected {_type_name(tp)}.")
    try:
        if get_origin(base) is list:
            (item_tp,) = get_args(base) or (str,)
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)):
                raise ValueError
            return [coerce(name, item_tp, v.strip() if isinstance(v, str) else v) for v in items]
        if get_origin(base) is Literal:
            allowed = get_args(base)
            if value in allowed:
                return value
            if isinstance(value, str) and value.lower() in allowed:
                return value.lower()
            raise ValueError
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                v = float(value.replace("_", ""))  # accepts 1e6 and 1_000_000
                if v.is_integer():
                    return int(v)
                raise ValueError
            if isinstance(value, int):
                return value
            raise ValueError
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            v = float(value)
            if not math.isfinite(v):
                raise ConfigError(f"Option '{name}' got {value!r}; it must be a finite number (not inf or nan).")
            return v
        if base is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except ConfigError:
        raise
    except (ValueError, TypeError):
        raise ConfigError(f"Option '{name}' got {value!r}; expected {_type_name(tp)}.") from None
    return value


def from_dict(cls, values: dict, *, source: str = "config") -> Any:
    """Build ``cls`` from a mapping, rejecting unknown keys (with suggestions) and wrong types."""
    fields = _field_map(cls)
    hints = typing.get_type_hints(cls)
    aliases = _alias_map(cls)
    kwargs = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        name = aliases.get(name, name)
        if name not in fields:
            import difflib
            close = difflib.get_close_matches(name, list(fields) + list(aliases), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"Unknown option '{key}' in {source}.{hint} Run `dsae train --help` or see the "
                              f"option reference in docs/options.md for valid options.")
        kwargs[name] = coerce(name, hints[name], value)
    return cls(**kwargs)


def load_config_file(path: str | Path) -> dict:
    """Read a YAML (.yaml/.yml) or TOML (.toml) file into a flat dict."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Config file {p} does not exist.")
    text = p.read_text()
    try:
        if p.suffix == ".toml":
            import tomllib
            data = tomllib.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text) or {}
    except Exception as e:  # parse errors from yaml/tomllib
        raise ConfigError(f"Could not parse config file {p}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {p} must hold a mapping of option: value, not {type(data).__name__}.")
    return data


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def add_arguments(parser, cls, *, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--flag`` per field of ``cls`` to an argparse parser, grouped, help from the field docs.
    Values are parsed later by :func:`coerce` so that files and flags share one validator."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        g = f.metadata.get("group") or "options"
        if g not in groups:
            groups[g] = parser.add_argument_group(g)
        flag = f.metadata.get("cli") or "--" + f.name.replace("_", "-")
        base, _ = _strip_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f"{f.metadata.get('help', '')} [{_type_name(hints[f.name])}; default: {default}]".replace("%", "%%")
        if base is bool:
            groups[g].add_argument(flag, dest=f.name, nargs="?", const="true", default=None,
                                   metavar="BOOL", help=help_text)
            groups[g].add_argument("--no-" + flag[2:], dest=f.name, action="store_const", const="false",
                                   help=argparse_suppress())
        else:
            groups[g].add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text)


def argparse_suppress():
    import argparse
    return argparse.SUPPRESS


def build_config(cls, *, config_file: Optional[str] = None, overrides: Optional[dict] = None):
    """defaults < file < overrides (CLI flags that were given)."""
    values: dict = {}
    if config_file:
        values.update(load_config_file(config_file))
    if overrides:
        values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = from_dict(cls, values, source=config_file or "command line")
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def config_reference_markdown(cls) -> str:
    """The option table of a config dataclass (`dsae options train|eval|study`, and the config-file tables of
    docs/options.md); a ``|`` in a help text is escaped so that it cannot end a table cell."""
    hints = typing.get_type_hints(cls)
    lines = ["| option | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        meaning = f.metadata.get("help", "").replace("|", "\\|")
        lines.append(f"| `{f.name}` | {_type_name(hints[f.name])} | `{json.dumps(default)}` | {meaning} |")
    return "\n".join(lines)
