"""Every project folder's dvc.yaml, made from one source: the six stages, for the folder's task.

A folder (the root, text/, lm/, a user's own from `distill new`) holds params.yaml, whose
`task:` names the task (distill/task.py). Its dvc.yaml is `render(folder)`: the same six
stages, commands and outputs for every task, with what the task declares filled in: the
user's files a stage reads, the baseline's params (the student's keys less the task's
distillation keys), evaluate's report files and the plots. Code deps are each stage's import
closure, computed from the source: the stage module's, and the task's method of that stage's
name (with the methods it calls through `self`), less the plumbing that moves no numbers.
`distill dvc-yaml` writes it; tests/test_code_deps.py fails when a committed one drifts.

The orchestration (app, flow, experiments) reads back where evaluate writes its files
from the folder's dvc.yaml (`evaluate_file`), so a path lives in dvc.yaml and nowhere else.
"""

from __future__ import annotations

import ast
import os
import shlex
import textwrap
from pathlib import Path

import yaml

from distill.config import load_params
from distill.errors import UserError
from distill.task import CHECKPOINTS, ROLES, STAGES, source_of, task_class

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("distill", "stages", "pipelines")
# Moves no numbers (the header written into every dvc.yaml says why); listed in no stage's deps.
PLUMBING = ("distill/config.py", "distill/classification_params.py", "distill/lm_params.py", "distill/io.py",
            "distill/errors.py", "distill/tracking.py", "distill/store.py", "distill/run_logging.py",
            "distill/journal.py", "distill/catchup.py", "distill/model_registry.py", "distill/progress.py",
            "distill/resume.py", "distill/interrupts.py", "stages/common.py")
MARKERS = ("distill/__init__.py", "stages/__init__.py")  # package markers: a docstring only
# evaluate's report files by name (another name: reports/<name>); only these two are cached, the rest
# (plot data, read by `dvc plots` and `dvc metrics` in any clone) live in git
REPORTS = {"compare": "reports/compare.md", "report": "reports/report.html", "predictions": "reports/predictions.csv"}
CACHED = ("compare", "report")

HEADER = """\
# The pipeline DAG, made by `distill dvc-yaml` from pipelines/dvcfile.py for the task params.yaml names
# ({task}): edit that, not this file (tests/test_code_deps.py fails when they differ).
# Each stage lists exactly the params keys it reads, and as code deps its import closure inside the
# project (the stage module and its task's method), so a code change reruns exactly the stages that
# run that code. Left out on purpose, as plumbing that moves no numbers:
# {plumbing}
# (config, classification_params, lm_params: params.yaml spells out every key, so no code default
# changes a result; io: atomic writes and hashes; tracking, store, run_logging, journal, catchup,
# model_registry: where and how runs are recorded; progress: bars and log lines; resume: a resumed
# run ends as the uninterrupted one; interrupts: when a stop is raised; stages/common.py: argument
# parsing, exit status).
# The `tracking` section is read by every stage and listed by none, like `runtime.device` (where the
# sums run); `runtime.precision` changes the numbers, so the stages that train or label list it.
# Each stage writes its MLflow run id to reports/runs/.
"""


def module_file(name: str, extra: dict[str, Path]) -> Path | None:
    """The file of a dotted module name inside the project (a package's __init__.py), else None.
    `extra`: modules outside the packages that count too (a user's task module)."""
    if name in extra:
        return extra[name]
    if name.split(".")[0] not in PACKAGES:
        return None
    path = REPO / Path(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return path / "__init__.py" if (path / "__init__.py").is_file() else None


def imported(nodes: list[ast.AST], extra: dict[str, Path]) -> set[Path]:
    """The project files the statements `nodes` import, at any depth, with their packages."""
    found: set[Path] = set()
    for node in (n for top in nodes for n in ast.walk(top)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from distill import data` imports distill/data.py; `from distill.models import X`, distill/models.py
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
                if (file := module_file(".".join(parts[:i]), extra)) is not None:
                    found.add(file)
    return found


def closure(starts: set[Path], extra: dict[str, Path] | None = None) -> set[Path]:
    """Every project file that importing `starts` runs, `starts` included."""
    extra = extra or {}
    seen, todo = set(), list(starts)
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(imported([ast.parse(path.read_text())], extra) - seen)
    return seen


def method_imports(file: Path, cls: str, method: str, extra: dict[str, Path]) -> set[Path]:
    """What the task module imports at its top, and what `cls.method` imports, with the
    methods it calls through `self` (a helper shared by two stages), transitively."""
    tree = ast.parse(file.read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    (body,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls]
    methods = {n.name: n for n in body.body if isinstance(n, ast.FunctionDef)}
    seen, todo = set(), [method]
    while todo:
        name = todo.pop()
        if name in seen or name not in methods:
            continue
        seen.add(name)
        todo.extend(n.func.attr for n in ast.walk(methods[name]) if isinstance(n, ast.Call)
                    and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)
                    and n.func.value.id == "self")
    return imported(top + [methods[name] for name in seen], extra)


def code_deps(task: str, stage: str) -> list[Path]:
    """The files `stage` runs for `task`: the stage module's import closure and its task method's."""
    file, cls = source_of(task)
    extra = {} if file.is_relative_to(REPO) else {task_class(task).__module__: file}
    starts = {REPO / "stages" / f"{stage}.py"} | method_imports(file, cls, stage, extra)
    skip = {REPO / p for p in PLUMBING + MARKERS}
    code = (closure(starts, extra) | {file}) - skip  # the task's file, but only what its stage method imports
    return sorted(code, key=lambda p: (p.name != f"{stage}.py", str(p)))


def stage_specs(task) -> dict[str, dict]:
    """The six stages' commands (as argument lists), data deps, params and outputs for `task`."""
    model = {role: (CHECKPOINTS[role], f"reports/train/{role}.csv") for role in ROLES}
    student = [f"student.{key}" for key in task.params_model.model_fields["student"].annotation.model_fields
               if key not in task.distillation_keys]

    teacher_view = [f"data/prepared/{n}" for n in getattr(task, "teacher_prepared", None) or ()] or ["data/prepared"]

    def training(role: str, soft: bool = False) -> dict:
        data = (teacher_view if role == "teacher" else ["data/prepared"]) + (["data/soft_labels"] if soft else [])
        args = ["--prepared", "data/prepared"] + (["--soft-labels", "data/soft_labels"] if soft else [])
        return {"args": args + ["--model", model[role][0], "--history", model[role][1]], "data": data,
                "outs": [model[role][0], model[role][1]]}

    reports = {name: REPORTS.get(name, f"reports/{name}") for name in task.reports}
    plots = getattr(task, "report_plots", {})
    return {
        "prepare": {"args": ["--out", "data/prepared"], "data": [], "params": ["data"], "outs": ["data/prepared"]},
        "train_teacher": training("teacher") | {"params": ["seed", "teacher", "distributed", "runtime.precision"]},
        "soft_labels": {"args": ["--teacher", CHECKPOINTS["teacher"], "--prepared", "data/prepared",
                                 "--out", "data/soft_labels"], "data": [CHECKPOINTS["teacher"], "data/prepared"],
                        "params": ["soft_labels", "runtime.precision"], "outs": ["data/soft_labels"]},
        "train_student": training("student", soft=True) | {"params": ["seed", "student", "distributed",
                                                                      "runtime.precision"]},
        "train_baseline": training("baseline") | {"params": ["seed", *student, "distributed", "runtime.precision"]},
        "evaluate": {
            "args": ["--prepared", "data/prepared"] + [a for role, (ckpt, _) in model.items() for a in (f"--{role}", ckpt)]
            + ["--metrics", "reports/metrics.json"] + [a for name, path in reports.items() for a in (f"--{name}", path)],
            "data": ["data/prepared"] + [ckpt for ckpt, _ in model.values()], "params": ["evaluate", "registry"],
            "outs": [path if name in CACHED else {path: {"cache": False}} for name, path in reports.items()
                     if name not in plots],
            "metrics": [{"reports/metrics.json": {"cache": False}}],
            "plots": [{reports[name]: {"cache": False} | props} for name, props in plots.items()]},
    }


def stages(folder: Path) -> tuple[dict, list[dict]]:
    """dvc.yaml's stages (each with `args`, its flag/value pairs) and top-level plots for the
    task `folder`/params.yaml names."""
    name = load_params(folder / "params.yaml", task=None).task
    task = task_class(name)
    out: dict = {}
    for stage, spec in stage_specs(task).items():
        receipt = f"reports/runs/{stage}.json"
        code = [os.path.relpath(path, folder) for path in code_deps(name, stage)]
        pairs = [f"{flag} {value}" for flag, value in zip(spec["args"][::2], spec["args"][1::2])]
        out[stage] = {"args": [f"python -m stages.{stage} --params params.yaml", *pairs, f"--receipt {receipt}"],
                      "deps": code + task.user_files.get(stage, []) + spec["data"], "params": spec["params"],
                      "outs": spec["outs"] + [receipt]} | {key: spec[key] for key in ("metrics", "plots") if spec.get(key)}
    return out, list(getattr(task, "pipeline_plots", []))


def evaluate_file(folder: Path, name: str) -> Path:
    """The file evaluate's `--<name>` names (metrics, compare, report, ...) in `folder`'s dvc.yaml,
    relative to the folder: where the pipeline writes it, read from the one place that says so."""
    dvc_yaml = Path(folder) / "dvc.yaml"
    if not dvc_yaml.is_file():
        raise UserError(f"{dvc_yaml}: not found; run distill from the project folder")
    stage = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {}).get("evaluate")
    if stage is None:
        raise UserError(f"{dvc_yaml} has no evaluate stage (`distill dvc-yaml` writes it)")
    cmd = stage["cmd"] if isinstance(stage["cmd"], str) else " ".join(stage["cmd"])
    words = shlex.split(cmd)
    given = {flag: value for flag, value in zip(words, words[1:]) if flag.startswith("--")}
    if f"--{name}" not in given:
        raise UserError(f"{dvc_yaml}: the evaluate stage's command has no --{name}")
    return Path(given[f"--{name}"])


def render(folder: Path) -> str:
    """The text of `folder`'s dvc.yaml."""
    folder = Path(folder).resolve()
    name = load_params(folder / "params.yaml", task=None).task
    plumbing = ", ".join(os.path.relpath(REPO / p, folder) for p in PLUMBING)
    lines = HEADER.format(task=name, plumbing="\n# ".join(textwrap.wrap(plumbing, 98))).splitlines()
    specs, plots = stages(folder)
    lines.append("stages:")
    for stage, spec in specs.items():
        lines += [f"  {stage}:", *_cmd(spec["args"])]
        for key in ("deps", "params", "outs", "metrics", "plots"):
            if spec.get(key):
                lines += [f"    {key}:", *(_item(item) for item in spec[key])]
        lines.append("")
    if plots:
        lines += ["plots:", yaml.safe_dump(plots, sort_keys=False, width=110).rstrip()]
    return "\n".join(lines).rstrip() + "\n"


def _cmd(parts: list[str], width: int = 104) -> list[str]:
    """A stage's command: one line when it fits, else folded (`>-`) a few flags a line."""
    if len(one := "    cmd: " + " ".join(parts)) <= width:
        return [one]
    lines = [""]
    for part in parts:
        lines[-1:] = [f"{lines[-1]} {part}".strip()] if len(lines[-1]) + len(part) < width - 6 else [lines[-1], part]
    return ["    cmd: >-", *(f"      {line}" for line in lines)]


def _item(item) -> str:
    """A list item: a path, a (${param} path, what it is) of the user's, or {path: {options}}."""
    if isinstance(item, tuple):
        return f"      - {item[0]}    # {item[1]}"
    if isinstance(item, dict):
        ((path, options),) = item.items()
        return "\n".join([f"      - {path}:", *(f"          {k}: {yaml.safe_dump(v).split(chr(10))[0]}"
                                                  for k, v in options.items())])
    return f"      - {item}"
