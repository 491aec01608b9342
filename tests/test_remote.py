"""A DVC remote: outputs and run cache pushed once, a fresh clone reproduces nothing.

One scratch project (tiny params, MLflow off) runs the pipeline twice, first with
`student.temperature: 2` (an earlier experiment), then with the committed params,
and pushes each run's outputs and the run cache to a local-path remote. Each test
then clones that repository afresh, with no DVC cache, and gets the outputs from
the remote instead of computing them.
"""

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import BIN, TINY_PARAMS, git_commit, subprocess_env, tiny_params, write_params
from scratch import make_scratch_project

pytestmark = pytest.mark.slow

ALL_STAGES = {"prepare", "train_teacher", "soft_labels", "train_student", "train_baseline", "evaluate"}


def dvc(repo: Path, *args: str) -> str:
    result = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=subprocess_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"dvc {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result.stdout + result.stderr


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", output))


def status(repo: Path, *args: str) -> dict:
    """`dvc status --json`: {} when every stage and output is up to date."""
    result = subprocess.run([str(BIN / "dvc"), "status", "--json", *args], cwd=repo, env=subprocess_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def git_clone(source: Path, dest: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(source), str(dest)], check=True, env=subprocess_env())
    assert not (dest / ".dvc" / "cache").exists(), "a fresh clone has no DVC cache"
    return dest


def output_files(repo: Path) -> list[str]:
    """Every file of every stage output recorded in dvc.lock, relative to the repository."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    files = []
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            path = repo / out["path"]
            paths = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            files += [p.relative_to(repo).as_posix() for p in paths]
    return files


def run_cache_entries(repo: Path) -> set[str]:
    runs = repo / ".dvc" / "cache" / "runs"
    return {p.relative_to(runs).as_posix() for p in runs.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def pushed(tmp_path_factory) -> dict:
    """A scratch project whose every run was pushed, with the run cache, to a local remote."""
    root = tmp_path_factory.mktemp("remote-test")
    project = make_scratch_project(root / "project", yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    remote = root / "remote"
    dvc(project, "remote", "add", "-d", "storage", str(remote))
    git_commit(project, "a local DVC remote")

    write_params(project / "params.yaml", tiny_params(**{"student.temperature": 2.0}))
    assert stages_run(dvc(project, "repro")) == ALL_STAGES
    dvc(project, "push", "--run-cache")
    student_t2 = (project / "models/student.pt").read_bytes()

    write_params(project / "params.yaml", TINY_PARAMS)
    assert stages_run(dvc(project, "repro")) == {"train_student", "evaluate"}
    git_commit(project, "tiny run")
    dvc(project, "push", "--run-cache")

    assert status(project) == {}
    assert status(project, "--cloud") == {}, "every output is on the remote"
    assert run_cache_entries(project) and any((remote / "runs").rglob("*"))
    files = output_files(project)
    assert {"models/student.pt", "data/soft_labels/provenance.json", "data/soft_labels/part-00000.parquet",
            "reports/metrics.json"} <= set(files)
    return {"project": project, "remote": remote, "files": files, "student_t2": student_t2}


def assert_same_outputs(clone: Path, pushed: dict) -> None:
    for rel in pushed["files"]:
        assert (clone / rel).read_bytes() == (pushed["project"] / rel).read_bytes(), rel


def test_a_fresh_clone_pulls_outputs_and_run_cache_and_reproduces_nothing(pushed, tmp_path):
    clone = git_clone(pushed["project"], tmp_path / "clone")
    assert status(clone) != {}  # nothing there yet

    dvc(clone, "pull", "--run-cache")
    assert status(clone) == {}
    assert_same_outputs(clone, pushed)
    assert run_cache_entries(clone) == run_cache_entries(pushed["project"])

    out = dvc(clone, "repro")
    assert stages_run(out) == set(), out
    assert "Data and pipelines are up to date" in out
    assert subprocess.run(["git", "status", "--porcelain"], cwd=clone, check=True, capture_output=True,
                          text=True).stdout == "", "dvc.lock and the metrics are unchanged"


def test_repro_pull_in_a_fresh_clone_fetches_instead_of_running(pushed, tmp_path):
    clone = git_clone(pushed["project"], tmp_path / "clone")
    out = dvc(clone, "repro", "--pull")
    assert stages_run(out) == set(), out
    assert status(clone) == {}
    assert_same_outputs(clone, pushed)


def test_the_run_cache_travels_an_earlier_value_is_restored_not_retrained(pushed, tmp_path):
    clone = git_clone(pushed["project"], tmp_path / "clone")
    write_params(clone / "params.yaml", tiny_params(**{"student.temperature": 2.0}))
    out = dvc(clone, "repro", "--pull")  # pulls the run cache itself
    assert run_cache_entries(clone) >= run_cache_entries(pushed["project"])
    assert "Stage 'train_student' is cached - skipping run" in out, out
    assert (clone / "models/student.pt").read_bytes() == pushed["student_t2"]
    # evaluate reruns: its reports/metrics.json is `cache: false` (kept in git), and
    # `dvc push` sends no object for it, so the remote run cache cannot restore that stage.
    assert stages_run(out) <= {"evaluate"}, out
    assert status(clone) == {}
