"""dvc.yaml's code dependencies are each stage's import closure, so a code change reruns
exactly the stages that run that code, and a new import can never be forgotten.

The closure is computed from the source (every `import` and `from ... import`, at any
depth, of a module inside the project), starting at the stage's own module. The
plumbing that dvc.yaml's header says it leaves out on purpose is subtracted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from conftest import REPO

PACKAGES = ("distill", "stages", "pipelines")
# Moves no numbers (dvc.yaml's header says why each is left out); package markers hold a docstring only.
PLUMBING = {"distill/config.py", "distill/io.py", "distill/errors.py", "distill/tracking.py", "distill/progress.py",
            "distill/resume.py", "stages/common.py", "distill/__init__.py", "stages/__init__.py", "stages/lm/__init__.py"}


def module_file(name: str) -> Path | None:
    """The project file of a dotted module name (a package's __init__.py), or None outside the project."""
    if name.split(".")[0] not in PACKAGES:
        return None
    path = REPO / Path(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def imported(path: Path) -> set[Path]:
    """The project files `path` imports, at any depth (function-level imports included),
    with the packages they sit in."""
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from distill import data` imports distill/data.py; `from distill.models import X`, distill/models.py
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
                if (file := module_file(".".join(parts[:i]))) is not None:
                    found.add(file)
    return found


def closure(start: Path) -> set[str]:
    """Every project file importing `start` runs, `start` included, relative to the repository."""
    seen, todo = set(), [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(imported(path) - seen)
    return {p.relative_to(REPO).as_posix() for p in seen}


# the MNIST-1D pipeline, and the text and language-model pipelines run from text/ and lm/ (paths from ../)
PIPELINES = {"dvc.yaml": "", "text/dvc.yaml": "../", "lm/dvc.yaml": "../"}
STAGES = {(file, name): spec for file in PIPELINES
          for name, spec in yaml.safe_load((REPO / file).read_text())["stages"].items()}


@pytest.mark.parametrize("file,stage", sorted(STAGES))
def test_a_stages_code_deps_are_its_import_closure_minus_the_declared_plumbing(file, stage):
    spec = STAGES[file, stage]
    module = spec["cmd"].split()[2]  # python -m stages.<name> ...
    code = closure(module_file(module)) - PLUMBING
    deps = [dep.removeprefix(PIPELINES[file]) for dep in spec["deps"]]
    listed = {dep for dep in deps if dep.endswith(".py") and dep.split("/")[0] in PACKAGES}  # not the user's own
    assert not code - listed, f"{stage} runs code dvc.yaml does not list: add {sorted(code - listed)}"
    assert not listed - code, f"{stage} lists code it never imports: remove {sorted(listed - code)}"


def test_the_plumbing_left_out_is_named_in_dvc_yamls_header():
    header = (REPO / "dvc.yaml").read_text().split("stages:", 1)[0]
    for path in PLUMBING - {"distill/__init__.py", "stages/__init__.py", "stages/lm/__init__.py"}:
        assert path.rsplit("/", 1)[-1] in header, path


def test_the_closure_follows_imports_inside_functions_too(tmp_path):
    # distill/distributed.py imports distill.tracking inside stage_run
    assert "distill/tracking.py" in closure(REPO / "distill" / "distributed.py")
    assert "distill/models.py" in closure(REPO / "stages" / "evaluate.py")
