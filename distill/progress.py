"""What a person watching a run sees: log lines, and progress bars (tqdm) on a terminal.

Log lines go to stderr, plain and filterable (`setup_logging`; DISTILL_LOG_LEVEL sets
the level). Bars go to stderr too and show only when stderr is a terminal and CI is
not set; DISTILL_PROGRESS=1 forces them on, DISTILL_PROGRESS=0 off. While a bar is
shown, log lines are written above it instead of through it.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

ENV = "DISTILL_PROGRESS"


LOG_FORMAT = "%(asctime)s %(source)s %(message)s"


def setup_logging() -> None:
    """Plain, filterable progress lines on stderr: time, source, message. The source is the logger's
    name, or the Prefect task or flow run a line is about ("prepare Finished in state Reused")."""
    logging.basicConfig(
        level=os.environ.get("DISTILL_LOG_LEVEL", "INFO"),
        format=LOG_FORMAT,
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RunSource) for f in handler.filters):
            handler.addFilter(RunSource())
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request to Prefect's API otherwise


class RunSource(logging.Filter):
    """Sets `record.source`: the task run's or flow run's name for Prefect's lines, else the logger's."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.source = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None) or record.name
        return True


def enabled(stream=None) -> bool:
    """Whether bars are shown: DISTILL_PROGRESS if set, else a terminal outside CI."""
    setting = os.environ.get(ENV, "").strip().lower()
    if setting in ("1", "true", "yes", "on"):
        return True
    if setting in ("0", "false", "no", "off"):
        return False
    stream = stream or sys.stderr
    return not os.environ.get("CI") and hasattr(stream, "isatty") and stream.isatty()


@contextmanager
def bar(total: int | None, desc: str, unit: str = "it", disable: bool = False, **kwargs) -> Iterator[tqdm]:
    """A tqdm bar (disabled off a terminal, or by `disable`); log lines are written above it meanwhile."""
    show = enabled() and not disable
    progress = tqdm(total=total, desc=desc, unit=unit, disable=not show, file=sys.stderr, dynamic_ncols=True,
                    mininterval=0.2, **kwargs)
    redirect = logging_redirect_tqdm() if show else nullcontext()
    with redirect, progress:
        yield progress
