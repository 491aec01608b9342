"""A new project folder in one command: `distill new FOLDER --task NAME`.

The folder gets a params.yaml with every key of the task's schema at its default and commented
with what it means, a dvc.yaml made by pipelines/dvcfile.py, data/raw/ for the user's files,
and DVC set up (`dvc init --subdir` inside a git repository, else a new repository), its `dvc
plots show` drawing offline (pipelines/plots_page.py). text/ and lm/ were started this way;
`distill dvc-yaml` rewrites a folder's dvc.yaml after a change.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml
from pydantic import BaseModel

from distill.errors import UserError
from distill.io import write_text
from distill.task import task_class
from pipelines.dvcfile import REPO, render
from pipelines.plots_page import template_path
from pipelines.tools import dvc


def params_yaml(schema: type[BaseModel], task: str) -> str:
    """params.yaml text: every key of `schema` at its default, with its description as a comment."""
    head = [f"# params.yaml of a {task} pipeline: every key, at its default (distill validate checks it).",
            "# dvc.yaml lists which keys each stage reads; `distill dvc-yaml` remakes it.", "", f"task: {task}"]
    return "\n".join(head + _fields(schema, 0, skip={"task"})) + "\n"


def _fields(schema: type[BaseModel], depth: int, skip: frozenset | set = frozenset()) -> list[str]:
    lines, pad = [], "  " * depth
    for name, field in schema.model_fields.items():
        if name in skip:
            continue
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            doc = " ".join((kind.__doc__ or "").strip().split("\n\n")[0].split())  # its first paragraph
            empty = " {}" if not kind.model_fields else ""
            lines += ([""] if depth == 0 else []) + [f"{pad}{name}:{empty}" + (f"  # {doc}" if doc else "")]
            lines += _fields(kind, depth + 1)
            continue
        value = yaml.safe_dump(field.get_default(call_default_factory=True), default_flow_style=True,
                               width=10_000).strip().removesuffix("\n...").removesuffix("...").strip()
        note = f"  # {' '.join(field.description.split())}" if field.description else ""
        lines.append(f"{pad}{name}: {value}{note}")
    return lines


def new_project(folder: Path, task: str) -> list[str]:
    """Create `folder` as a project of `task`; returns what was made. Refuses a folder that has a pipeline."""
    schema = task_class(task, folder).params_model
    if (folder / "params.yaml").exists() or (folder / "dvc.yaml").exists():
        raise UserError(f"{folder}: already holds a pipeline (params.yaml or dvc.yaml); choose a new folder")
    (folder / "data" / "raw").mkdir(parents=True, exist_ok=True)
    (folder / "data" / "raw" / ".gitkeep").touch()
    write_text(folder / "params.yaml", params_yaml(schema, task))
    made = ["params.yaml", "data/raw/"]
    if not (folder / ".dvc").is_dir():
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=folder, capture_output=True, text=True)
        if top.returncode != 0:  # not inside a repository: the folder becomes one
            subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
            made.append(".git/ (git init)")
        subdir = ["--subdir"] if top.returncode == 0 and Path(top.stdout.strip()).resolve() != folder.resolve() else []
        dvc(folder, "init", "-q", *subdir)
        made.append(".dvc/ (dvc init" + (" --subdir)" if subdir else ")"))
    if (REPO / ".dvc" / "plots").is_dir():  # the plot templates dvc.yaml may name (by_model), the offline page
        shutil.copytree(REPO / ".dvc" / "plots", folder / ".dvc" / "plots", dirs_exist_ok=True)
        dvc(folder, "config", "plots.html_template", template_path().relative_to(REPO / ".dvc").as_posix())
    write_text(folder / "dvc.yaml", render(folder))
    return made + ["dvc.yaml"]


def write_dvc_yaml(folder: Path, check: bool = False) -> bool:
    """Write `folder`'s dvc.yaml from pipelines/dvcfile.py; with `check`, only say whether it is
    current. Returns True when the file on disk is (now) the rendered one."""
    text = render(folder)
    path = folder / "dvc.yaml"
    if check:
        return path.is_file() and path.read_text() == text
    write_text(path, text)
    return True
