"""The error type for problems the user can fix.

A `UserError` carries one sentence naming the file or key and the fix; the
command-line entry points (distill.cli) print it without a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in the user's params, data or inputs, described in one sentence."""
