"""The task interface carries a task the library has never seen: regression on a table
(tests/regression_task.py, one file outside distill/), in a folder made by `distill new`,
through the same six stage modules, under `dvc repro`, with DVC rerunning only what a change
touches. And the pieces a new folder is made of: params.yaml with every key, a current dvc.yaml."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ALL_STAGES, BIN, REPO, git_commit, repro, run_pipeline_in_process, subprocess_env
from distill.config import load_params
from distill.errors import UserError
from pipelines import plots_page
from pipelines.experiments import one_line, project_task
from scratch import make_scratch_project

TASK = "regression_task:RegressionTask"
SMALL = {"data": {"rows": 200}, "teacher": {"epochs": 60}, "student": {"epochs": 60}, "tracking": {"enabled": False}}


def distill(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "distill"), *args], cwd=cwd, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)


def new_regression_folder(parent: Path) -> Path:
    """`distill new` of the regression task beside its module, with small params."""
    folder = parent / "regression"
    folder.mkdir(parents=True)
    shutil.copy(REPO / "tests" / "regression_task.py", folder)
    made = distill(parent, "new", "regression", "--task", TASK)
    assert made.returncode == 0, made.stdout + made.stderr
    params = yaml.safe_load((folder / "params.yaml").read_text())
    for section, values in SMALL.items():
        params[section] |= values
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return folder


def test_a_new_folder_has_every_key_of_its_task_commented_and_a_current_dvc_yaml(tmp_path):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    made = distill(tmp_path, "new", "my-lm", "--task", "language_model")
    assert made.returncode == 0, made.stderr
    folder = tmp_path / "my-lm"
    text = (folder / "params.yaml").read_text()
    params = load_params(folder / "params.yaml", task="language_model")
    assert params.student.width == 128 and "# tokens per window" in text.replace("  ", " ")
    assert (folder / "data" / "raw").is_dir() and (folder / ".dvc").is_dir()
    assert plots_page.template_path(folder).read_text() == plots_page.template_path().read_text()  # plots offline
    assert distill(folder, "dvc-yaml", "--check").returncode == 0
    again = distill(tmp_path, "new", "my-lm", "--task", "language_model")
    assert again.returncode == 2 and "already holds a pipeline" in again.stderr
    assert "Traceback" not in again.stderr


def test_an_unknown_task_is_refused_in_one_sentence(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("task: nowhere.to_be:Found\n")
    with pytest.raises(UserError, match="cannot import nowhere.to_be"):
        load_params(path, task=None)


def test_a_third_task_runs_through_the_six_stages_in_process(tmp_path):
    folder = new_regression_folder(make_scratch_project(tmp_path / "project"))
    results = run_pipeline_in_process(folder)
    assert set(results) == set(ALL_STAGES)
    metrics = json.loads((folder / "reports" / "metrics.json").read_text())
    mse = {role: metrics[role]["test_mse"] for role in ("teacher", "student", "baseline")}
    assert all(math.isfinite(v) for v in mse.values()), mse
    assert mse["teacher"] < mse["baseline"], mse  # the wide teacher fits the function better
    assert (folder / "reports" / "compare.md").read_text().startswith("| model | test MSE |")
    said = one_line("p", metrics, project_task(folder).headline)  # what a sweep says of a point
    assert said.startswith(f"p: teacher {mse['teacher']:.4f} MSE, student ")


@pytest.mark.slow
def test_a_third_task_runs_under_dvc_repro_and_reruns_only_what_a_change_touches(tmp_path):
    project = make_scratch_project(tmp_path / "project")
    folder = new_regression_folder(project)
    deps = yaml.safe_load((folder / "dvc.yaml").read_text())["stages"]["train_student"]["deps"]
    assert "regression_task.py" in deps and "../distill/classification.py" not in deps
    git_commit(project, "a regression project")
    assert repro(folder) == set(ALL_STAGES)
    assert repro(folder) == set()
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["student"]["alpha"] = 0.3
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert repro(folder) == {"train_student", "evaluate"}
    status = subprocess.run([str(BIN / "dvc"), "status"], cwd=folder, env=subprocess_env(), capture_output=True,
                            text=True)
    assert "up to date" in status.stdout, status.stdout
