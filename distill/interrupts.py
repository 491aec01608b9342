"""A stage's stop request (Ctrl-C, SIGTERM), raised between whole writes to the run store.

A stage stops on its first Ctrl-C or SIGTERM by a KeyboardInterrupt in its main thread
(stages/common.py), wherever that thread is. Inside a call to the SQLite MLflow store, that
can leave the interrupted transaction's lock held by one of the stage's own connections; the
run's ending as KILLED then waits on it (SQLite's busy timeout) until `distill run` kills the
stage, and the run stays RUNNING. Store calls run inside `deferred()`: a stop that arrives
there is raised as the call ends, whole (distill/store.py's `_retry_locked`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_now = {"depth": 0, "pending": False}  # the main thread's open sections; a stop waiting for them


def stop() -> None:
    """Stop the stage: KeyboardInterrupt now, or at the end of the deferred section under way.
    Called from a signal handler, so in the main thread."""
    if _now["depth"]:
        _now["pending"] = True
        return
    raise KeyboardInterrupt


@contextmanager
def deferred() -> Iterator[None]:
    """A section a stop does not cut: one arriving inside it is raised as it ends, in place of
    any error the section raised (the stage is stopping either way). Other threads' sections
    defer nothing: a signal is only ever handled in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _now["depth"] += 1
    try:
        yield
    finally:
        _now["depth"] -= 1
        if not _now["depth"] and _now["pending"]:
            _now["pending"] = False
            raise KeyboardInterrupt
