"""User-facing errors.

Every error a user can fix derives from :class:`UserError` (directly, or by being registered below), so the CLI
prints its one-paragraph message instead of a traceback. Library callers can catch them as usual.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment; the message names the problem and the fix."""


class RunDirError(UserError):
    """The run directory cannot be used as asked (another run lives there, nothing to resume, ...)."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """All exception classes the CLI reports as plain messages (imported lazily so the CLI starts fast)."""
    from .config import ConfigError

    types_: list[type[BaseException]] = [UserError, ConfigError]
    for mod, names in [
        ("domain_sae.models.load", ["ModelLoadError"]),
        ("domain_sae.models.hooks", ["HookError"]),
        ("domain_sae.data.sources", ["DataError"]),
        ("domain_sae.sae.io", ["SAEFormatError", "SAESourceError"]),
        ("domain_sae.sae.standard", ["SAECompatibilityError"]),
    ]:
        try:
            module = __import__(mod, fromlist=names)
        except ImportError:
            continue
        types_.extend(getattr(module, n) for n in names if hasattr(module, n))
    return tuple(types_)
