"""Problems the user can fix, and the one rule for reporting them.

A `UserError` carries one sentence naming the file or key and the fix. Every entry
point (the stage commands, the `distill` command, the flow) reports one the same
way, through `report`: that sentence on one line, exit status 2, no traceback;
DISTILL_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem in the user's params, data or inputs, described in one sentence."""


def report(exc: Exception, emit: Callable[[str], object] | None = None) -> int:
    """Say `exc` as one line "error: ..." (through `emit`, by default the "distill" logger) and
    return the exit status for it; under DISTILL_DEBUG=1 re-raise it, traceback and all."""
    if os.environ.get("DISTILL_DEBUG"):
        raise exc
    (emit or logging.getLogger("distill").error)(f"error: {exc}")
    return EXIT_USER_ERROR
