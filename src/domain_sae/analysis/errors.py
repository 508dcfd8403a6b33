"""The one exception type of the analysis package."""

from __future__ import annotations

from ..errors import UserError


class AnalysisError(UserError, ValueError):
    """Inputs to an analysis function that cannot be compared or fitted (wrong shapes, empty sets, k out of range).

    The message names the argument, what was received and how to fix the call.
    """
