"""The task interface: what differs between one kind of model and another, behind one Protocol.

A pipeline has six stages (prepare, train_teacher, soft_labels, train_student,
train_baseline, evaluate) and every stage module under stages/ is the same thin command
for every task: it reads params.yaml, finds the task that file names (`task:`), opens
the stage's tracked run, and calls the task's method for that stage. What a task decides
lives in its class and nowhere else: how data is prepared, which models are built, how
they train, what a soft label is, how models are scored and reported, what is logged.

Built-in tasks are named in TASKS; a user's own task is named in params.yaml by import
path (`task: my_package.regression:RegressionTask`), like a user's own architecture.
Tasks are imported by name when a stage runs, so a stage's code (and its DVC code deps)
is the stage module plus the one method of the one task it calls: a classifier edit never
reruns a language model's stage.

Each of the six methods is named after its stage and imports the library modules it runs
inside its own body (or in a helper method it calls through `self`), not at the top of the
task's module: a stage's DVC code deps are the stage module's import closure and its
method's (pipelines/dvcfile.py computes them; tests/test_code_deps.py checks every dvc.yaml).
"""

from __future__ import annotations

import importlib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from distill.errors import UserError
from distill.registry import IMPORT_PATH, imported

STAGES = ("prepare", "train_teacher", "soft_labels", "train_student", "train_baseline", "evaluate")
ROLES = ("teacher", "student", "baseline")  # the models a pipeline trains; train_<role> is its stage
CHECKPOINTS = {role: f"models/{role}.pt" for role in ROLES}  # where train_<role> writes it (dvc.yaml's outs)

TASKS = {
    "classify": "distill.classification:ClassificationTask",
    "language_model": "distill.language_model:LanguageModelTask",
}


@dataclass(frozen=True)
class TrainPaths:
    """The files a training stage was given on its command line (dvc.yaml writes them)."""

    prepared: Path
    model: Path
    history: Path
    soft_labels: Path | None = None  # train_student only


@dataclass(frozen=True)
class EvaluatePaths:
    """evaluate's inputs and outputs: the three checkpoints and the task's report files by name."""

    prepared: Path
    checkpoints: dict[str, Path]
    outputs: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class Headline:
    """A task's headline test metric: what a sweep's summary and one-line results show the three
    models by (pipelines/experiments.py), and the first metric `distill compare --exps` keeps."""

    key: str  # the metric in each model's entry of metrics.json
    label: str  # a summary's column after the model's name: "student acc"
    unit: str  # after each value in a one-line result: "97.20%", "7.171 bits/token"
    scale: float = 1.0  # the value shown is scale * value, to `digits` decimals
    digits: int = 2
    lower_is_better: bool = False

    def show(self, value: float) -> str:
        return f"{self.scale * value:.{self.digits}f}"


class Task(Protocol):
    """One kind of model distilled by the pipeline. Each method named after a stage runs that stage
    inside the stage's tracked run (`run`: tracking.StageRun) and returns what the stage prints.
    `check` runs before any stage, in the project folder: it reads the user's files (a table's
    header, a tokenizer, a teacher's folder) and refuses in one sentence what a stage would refuse
    only after DVC had deleted that stage's last outputs."""

    name: ClassVar[str]
    # the params.yaml schema (a pydantic model with at least task, seed, tracking, runtime, distributed)
    params_model: ClassVar[type]
    # the student keys the baseline does not read (DVC reruns it on none of them)
    distillation_keys: ClassVar[tuple[str, ...]]
    # evaluate's outputs besides the metrics: command-line name -> what it is
    reports: ClassVar[dict[str, str]]
    # files of the user's that a stage reads, as ${param} paths: stage -> [(path, what it is)]
    user_files: ClassVar[dict[str, list[tuple[str, str]]]]
    # the files of data/prepared the teacher reads, when not all of it (None, or left out: the whole folder)
    teacher_prepared: ClassVar[tuple[str, ...] | None]
    # dvc.yaml's plots: report files `dvc plots show` draws (name -> plot properties), and the
    # top-level plots across the three models (dvc.yaml's `plots:` entries)
    report_plots: ClassVar[dict[str, dict]]
    pipeline_plots: ClassVar[list[dict]]
    # the headline test metric, and the columns `distill compare --exps` keeps besides it: more
    # of each model's metrics, and params.yaml keys (dotted)
    headline: ClassVar[Headline]
    exp_metrics: ClassVar[tuple[str, ...]]
    exp_params: ClassVar[tuple[str, ...]]

    def check(self, params: Any) -> None: ...  # refuse, before DVC touches anything, what the stages would

    def prepare(self, params: Any, out: Path, run: Any) -> dict: ...

    def train_teacher(self, params: Any, paths: TrainPaths, world: Any, run: Any) -> dict: ...

    def soft_labels(self, params: Any, teacher: Path, prepared: Path, out: Path, run: Any) -> dict: ...

    def train_student(self, params: Any, paths: TrainPaths, world: Any, run: Any) -> dict: ...

    def train_baseline(self, params: Any, paths: TrainPaths, world: Any, run: Any) -> dict: ...

    def evaluate(self, params: Any, paths: EvaluatePaths, run: Any) -> dict: ...

    def served(self, model: Any) -> Any: ...  # the model as it is logged and served (from a checkpoint's)


def task_class(name: str, folder: Path | None = None) -> type:
    """The class of the task `name` (a built-in name or `package.module:Class`, importable as it is
    or from `folder`, the project folder); one sentence if none."""
    where = TASKS.get(name, name)
    if folder is not None and name not in TASKS and str(folder.resolve()) not in sys.path:
        sys.path.append(str(folder.resolve()))  # a task module kept beside params.yaml
    if not re.match(IMPORT_PATH, where):
        raise UserError(f"task = {name!r} is not allowed: must be one of {', '.join(TASKS)}, "
                        "or package.module:Class (a task of your own)")
    return imported(where, f"task {name}")


def get_task(name: str) -> Task:
    """An instance of the task `name`."""
    return task_class(name)()


def source_of(name: str) -> tuple[Path, str]:
    """The file and class name of task `name`, for pipelines/dvcfile.py: a stage's code deps
    include the import closure of the task's method of that stage's name."""
    cls = task_class(name)
    return Path(importlib.import_module(cls.__module__).__file__), cls.__name__
