"""What every stage command line shares: argument parsing and the exit status.

Stage entry points run under `cli_main`, which reports a `UserError` by the one rule
of distill.errors (one line, exit status 2, no traceback).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from distill.errors import UserError, report
from distill.progress import setup_logging


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


def cli_main(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run a stage's `main`; a `UserError` becomes one line and exit status 2."""
    setup_logging()
    try:
        main(argv)
    except UserError as exc:
        return report(exc)
    return 0
