"""What every stage command line shares: argument parsing, logging, error reporting.

Stage entry points run under `cli_main`, which prints a `UserError` as one
sentence and exits with status 2, without a traceback; DISTILL_DEBUG=1 shows it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from distill.errors import UserError

log = logging.getLogger("distill")

# This interpreter's scripts (dvc, mlflow, prefect, torchrun): run by path, and first on
# PATH for what they start themselves (DVC runs stage commands and queue workers from PATH).
BIN = Path(sys.executable).parent


def tool_env(**extra: str) -> dict[str, str]:
    """os.environ with BIN first on PATH, plus `extra`, for dvc / mlflow subprocesses."""
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra)

EXIT_USER_ERROR = 2


def stage_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser that shows the stage's docstring and takes --params."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--receipt", help="JSON file to write the stage's MLflow run id to")
    return parser


def training_parser(doc: str | None) -> argparse.ArgumentParser:
    """The arguments every training stage takes: its inputs, checkpoint and history."""
    parser = stage_parser(doc)
    parser.add_argument("--prepared", required=True, help="prepared-data directory")
    parser.add_argument("--model", required=True, help="checkpoint to write")
    parser.add_argument("--history", required=True, help="per-epoch CSV to write")
    return parser


def setup_logging() -> None:
    """Plain, filterable progress lines on stderr."""
    logging.basicConfig(
        level=os.environ.get("DISTILL_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(name)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def cli_main(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run a stage's `main`, turning a `UserError` into one line and exit status 2."""
    setup_logging()
    try:
        main(argv)
    except UserError as exc:
        if os.environ.get("DISTILL_DEBUG"):
            raise
        log.error("error: %s", exc)
        return EXIT_USER_ERROR
    return 0
