"""User-facing errors.

Every error a user can fix derives from :class:`UserError` (each package defines its own subclasses beside the code
that raises them: ``ConfigError``, ``DataError``, ``ModelLoadError``, ``HookError``, ``SAEFormatError``, ...), so the
CLI catches ``UserError`` alone and prints its one-paragraph message instead of a traceback. Library callers can
catch them as usual; most also derive from the builtin they refine (``ValueError``, ``RuntimeError``).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment; the message names the problem and the fix."""


class RunDirError(UserError):
    """The run directory cannot be used as asked (another run lives there, nothing to resume, ...)."""

