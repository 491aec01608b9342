"""What every stage command line shares: argument parsing, the task, what a run logs, the exit status.

Every stage reads params.yaml, takes the task it names (distill/task.py) and calls the
task's method of the stage's name, inside its MLflow run: the run records the stage's
params.yaml sections and is tagged with a fingerprint of the stage's DVC inputs (its
dvc.yaml deps, by content, and those params). Stage entry points run under `cli_main`,
which reports a `UserError` by the one rule of distill.errors (one line, exit status 2,
no traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from distill import interrupts, tracking
from distill.config import load_params
from distill.errors import UserError, report
from distill.io import tree_sha256
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


def open_run(stage: str, params: Any, task: Task, receipt: str | None):
    """The stage's MLflow run (distill.tracking.stage_run): what it records of params.yaml, and
    the fingerprint of its DVC inputs, computed only if the run is recorded."""
    record = logged(stage, params, task)
    return tracking.stage_run(stage, params.tracking, record, receipt, inputs_sha256=fingerprint(stage, record))


def fingerprint(stage: str, record: dict) -> Callable[[], str]:
    """`stage_inputs_sha256` of the stage, when called (hashing the deps reads every data file)."""
    return lambda: stage_inputs_sha256(stage, record)


def stage_inputs_sha256(stage: str, params: dict, dvc_yaml: Path = Path("dvc.yaml")) -> str:
    """A fingerprint of what DVC records as the stage's inputs: its deps (as listed in
    dvc.yaml, hashed by content) and its params. Equal fingerprints, equal dvc.lock deps."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    for dep in dvc_deps(stage, dvc_yaml):
        digest.update(dep.encode())
        digest.update(tree_sha256(dep).encode() if Path(dep).exists() else b"missing")
    return digest.hexdigest()


def dvc_deps(stage: str, dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """`stage`'s deps as dvc.yaml lists them, each ${section.key} filled in from params.yaml by
    DVC's own templating; none without a dvc.yaml (a stage run by hand). A dep DVC cannot
    resolve is kept as written (DVC itself would refuse to run the stage)."""
    import yaml

    if not dvc_yaml.is_file():
        return []
    spec = yaml.safe_load(dvc_yaml.read_text()) or {}
    deps = spec.get("stages", {}).get(stage, {}).get("deps", [])
    if not any("${" in dep for dep in deps):
        return deps
    from dvc.parsing import DataResolver, ResolveError
    from dvc.repo import Repo

    folder = str(dvc_yaml.resolve().parent)
    with Repo(folder, uninitialized=True) as repo:
        try:
            return DataResolver(repo, folder, spec).resolve_one(stage)[stage]["deps"]
        except ResolveError:
            return deps


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
    """Run a stage's `main`; a `UserError` becomes one line and exit status 2. Ctrl-C and SIGTERM
    (what `distill run` sends a stage when it is stopped, and `timeout` or a scheduler) end the
    stage alike: its MLflow run ends KILLED, nothing half-written stays, exit 130 (143).

    An interrupted process exits as soon as that is done, skipping the interpreter's teardown:
    with torch and MLflow loaded it takes a second on an idle machine and several on a busy
    one, which a stopped `distill run` would spend waiting for its stage (pipelines/lifecycle.py)."""
    setup_logging()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    try:
        main(argv)
    except UserError as exc:
        return report(exc)
    except KeyboardInterrupt:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(143 if _interrupt.by_sigterm else 130)
    return 0


def _interrupt(signum, frame) -> None:
    """The first Ctrl-C or SIGTERM stops the stage; a second one (a terminal's Ctrl-C reaches the
    stage, then `distill run` stops it with SIGTERM) must not cut short the run's ending as KILLED,
    or MLflow's exit hook would end it FINISHED."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    _interrupt.by_sigterm = signum == signal.SIGTERM
    interrupts.stop()  # now, or as the write to the run store under way ends


_interrupt.by_sigterm = False
