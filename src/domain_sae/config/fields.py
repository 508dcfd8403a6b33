"""The documented config field: one definition shared by every options dataclass (:mod:`domain_sae.config`,
:mod:`domain_sae.config.architecture`)."""

from __future__ import annotations

from dataclasses import field
from typing import Any, Optional


def opt(default: Any, help: str, *, group: str = "", cli: Optional[str] = None, aliases: tuple[str, ...] = ()):
    """A config field with documentation. ``cli`` overrides the flag name, ``aliases`` are accepted file keys
    (e.g. SAELens's ``hook_name`` for our ``hook``)."""
    meta = {"help": help, "group": group, "cli": cli, "aliases": aliases}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)
