"""One pipeline description: every project folder's dvc.yaml is what pipelines/dvcfile.py makes
for its task, and the code deps it lists are each stage's import closure, so a code change
reruns exactly the stages that run that code, and a new import can never be forgotten.

The closure is computed from the source (every `import` and `from ... import`, at any depth,
of a module inside the project), starting at the stage module and at the task's method of the
stage's name. The plumbing that dvc.yaml's header says it leaves out on purpose is subtracted.
"""

from __future__ import annotations

import ast
import textwrap

import pytest
import yaml

from conftest import REPO
from pipelines import dvcfile

FOLDERS = ("", "text", "lm")  # the MNIST-1D pipeline, and the text and language-model pipelines


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda f: f or "root")
def test_each_committed_dvc_yaml_is_what_its_task_makes(folder):
    path = REPO / folder / "dvc.yaml"
    assert path.read_text() == dvcfile.render(REPO / folder), \
        f"{path.relative_to(REPO)} drifted from pipelines/dvcfile.py: run distill dvc-yaml {folder or '.'}"


def independent_closure(start) -> set[str]:
    """Project files `start` imports, followed to the end, computed here without dvcfile's code."""
    seen, todo = set(), [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                candidate = REPO / (name.replace(".", "/") + ".py")
                if name.split(".")[0] in dvcfile.PACKAGES and candidate.is_file():
                    todo.append(candidate)
    return {p.relative_to(REPO).as_posix() for p in seen}


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda f: f or "root")
def test_a_stages_code_deps_hold_its_whole_import_closure_minus_the_plumbing(folder):
    prefix = "../" if folder else ""
    for stage, spec in yaml.safe_load((REPO / folder / "dvc.yaml").read_text())["stages"].items():
        listed = {dep.removeprefix(prefix) for dep in spec["deps"] if dep.endswith(".py")}
        module = REPO / "stages" / f"{stage}.py"
        code = independent_closure(module) - set(dvcfile.PLUMBING) - set(dvcfile.MARKERS)
        assert code <= listed, f"{folder}/dvc.yaml {stage} runs code it does not list: {sorted(code - listed)}"
        task_file = {dep for dep in listed if dep in ("distill/classification.py", "distill/language_model.py")}
        assert len(task_file) == 1, f"{stage}: its task's module is a dep"


def test_a_language_model_stage_does_not_rerun_on_a_classifier_training_edit():
    lm = yaml.safe_load((REPO / "lm" / "dvc.yaml").read_text())["stages"]
    for stage, spec in lm.items():
        assert "../distill/training.py" not in spec["deps"], stage
        assert "../distill/classification.py" not in spec["deps"], stage
    root = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert "distill/lm.py" not in root["train_student"]["deps"]


def test_a_stage_depends_on_what_its_own_task_method_imports_not_the_other_methods(tmp_path):
    module = tmp_path / "mytask.py"
    module.write_text(textwrap.dedent("""
        from distill import task

        class T:
            def prepare(self):
                from distill import data
            def train_teacher(self):
                self._fit()
            def _fit(self):
                from distill import training
    """))
    extra = {"mytask": module}
    assert dvcfile.method_imports(module, "T", "prepare", extra) == {REPO / "distill" / "data.py",
                                                                     REPO / "distill" / "__init__.py",
                                                                     REPO / "distill" / "task.py"}
    assert REPO / "distill" / "training.py" in dvcfile.method_imports(module, "T", "train_teacher", extra)
    assert REPO / "distill" / "data.py" not in dvcfile.method_imports(module, "T", "train_teacher", extra)


def test_the_closure_follows_imports_inside_functions_too():
    # distill/distributed.py imports distill.tracking inside rank_stage_run
    assert REPO / "distill" / "tracking.py" in dvcfile.closure({REPO / "distill" / "distributed.py"})


def test_the_plumbing_left_out_is_named_in_each_dvc_yamls_header():
    for folder in FOLDERS:
        header = (REPO / folder / "dvc.yaml").read_text().split("stages:", 1)[0]
        for path in dvcfile.PLUMBING:
            assert path.rsplit("/", 1)[-1] in header, (folder, path)


def test_the_baseline_reads_every_student_key_but_the_distillation_ones():
    from distill.task import get_task

    for folder in FOLDERS:
        stages = yaml.safe_load((REPO / folder / "dvc.yaml").read_text())["stages"]
        task = get_task(yaml.safe_load((REPO / folder / "params.yaml").read_text())["task"])
        baseline = {key.removeprefix("student.") for key in stages["train_baseline"]["params"] if "student." in key}
        fields = set(task.params_model.model_fields["student"].annotation.model_fields)
        assert baseline == fields - set(task.distillation_keys)
        assert "student" in stages["train_student"]["params"]
