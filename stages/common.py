"""What every stage command line shares: argument parsing, the task, what a run logs, the exit status.

Every stage reads params.yaml, takes the task it names (distill/task.py) and calls the
task's method of the stage's name. Stage entry points run under `cli_main`, which reports
a `UserError` by the one rule of distill.errors (one line, exit status 2, no traceback).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from typing import Any

from distill.config import load_params
from distill.errors import UserError, report
from distill.progress import setup_logging
from distill.task import Task, get_task

# the params.yaml sections each stage's MLflow run records (dvc.yaml lists the keys the stage reads)
LOGGED = {
    "prepare": ("data",),
    "train_teacher": ("seed", "teacher", "distributed", "runtime"),
    "soft_labels": ("soft_labels", "runtime"),
    "train_student": ("seed", "student", "distributed", "runtime"),
    "train_baseline": ("seed", "student", "distributed", "runtime"),  # less the task's distillation keys
    "evaluate": ("evaluate", "registry", "runtime"),
}


def stage_params(path: str) -> tuple[Any, Task]:
    """The validated params.yaml and the task it names."""
    params = load_params(path, task=None)
    return params, get_task(params.task)


def logged(stage: str, params: Any, task: Task) -> dict:
    """What `stage`'s run records of params.yaml: its sections, the baseline's without distillation keys."""
    out = {}
    for name in LOGGED[stage]:
        value = getattr(params, name)
        exclude = set(task.distillation_keys) if (stage, name) == ("train_baseline", "student") else None
        out[name] = value.model_dump(exclude=exclude) if hasattr(value, "model_dump") else value
    return out


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
