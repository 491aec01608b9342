"""Sweeps on Dask: a 2-point sweep as parallel Prefect tasks on a LocalCluster, each point one
DVC experiment, both results in one summary, in `dvc exp show` and in MLflow."""

import os
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from conftest import BIN, git_commit, subprocess_env, tiny_params, write_params
from pipelines.experiments import exp_rev, metrics

pytestmark = pytest.mark.slow


def new_processes(before: set[int]) -> list[psutil.Process]:
    """This process's descendants started since `before` (the multiprocessing resource tracker,
    which lives as long as this process, aside)."""
    out = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.pid not in before and "resource_tracker" not in " ".join(proc.cmdline()):
                out.append(proc)
        except psutil.NoSuchProcess:
            pass
    return out


def accepts_connections(address: str) -> bool:
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        return True
    except OSError:
        return False


@pytest.mark.usefixtures("flow_module")  # the session's Prefect test harness
def test_a_two_point_sweep_runs_as_parallel_dask_tasks_and_both_results_reach_mlflow(project: Path):
    from mlflow import MlflowClient

    from pipelines.sweep import run_sweep

    # the pipeline once, committed: the sweep's experiments reuse its teacher and soft labels
    write_params(project / "params.yaml", tiny_params(**{"tracking.enabled": True}))
    subprocess.run([str(BIN / "dvc"), "repro", "--quiet"], cwd=project, env=subprocess_env(), check=True,
                   capture_output=True, timeout=900)
    git_commit(project, "tracking on, pipeline run")

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    result = run_sweep({"student.temperature": ["2", "8"]}, workers=2, dask=True, repo_dir=str(project))

    # one comparison with both points
    rows = [line.split(" | ") for line in result["summary"].splitlines() if line.startswith("| sweep-")]
    assert [(row[0], row[1]) for row in rows] == [("| sweep-temperature2", "2"), ("| sweep-temperature8", "8")]

    # the tasks ran on Dask: two worker processes of one scheduler, at the same time
    points = {p["name"]: p for p in result["points"]}
    assert set(points) == {"sweep-temperature2", "sweep-temperature8"}
    a, b = points.values()
    assert a["worker"] != b["worker"] and a["worker"].startswith("tcp://127.0.0.1:")
    assert a["scheduler"] == b["scheduler"]
    assert len({a["pid"], b["pid"], os.getpid()}) == 3
    assert a["started"] < b["finished"] and b["started"] < a["finished"], "the two points overlapped"

    # each point is a DVC experiment of the project
    shown = subprocess.run([str(BIN / "dvc"), "exp", "show", "--csv"], cwd=project, env=subprocess_env(),
                           capture_output=True, text=True, check=True).stdout
    assert "sweep-temperature2" in shown and "sweep-temperature8" in shown
    # and in the project's MLflow store: a train_student run per point with its temperature, an evaluate
    # run whose student accuracy is the experiment's
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    for name, temperature in (("sweep-temperature2", "2.0"), ("sweep-temperature8", "8.0")):
        runs = client.search_runs([experiment.experiment_id],
                                  f"tags.`distill.pipeline_run` LIKE '%-{name}'", max_results=100)
        by_name = {r.info.run_name: r for r in runs}
        student = by_name["train_student"]
        assert student.data.params["student.temperature"] == temperature
        assert {"best_val_accuracy", "train_kd", "val_accuracy"} <= set(student.data.metrics)
        assert "train_teacher" not in by_name, "the teacher came from DVC's cache"
        accuracy = by_name["evaluate student"].data.metrics["test_accuracy"]
        assert accuracy == pytest.approx(metrics(project, exp_rev(project, name))["student"]["test_accuracy"])

    # nothing left behind: no worker, nanny or scheduler, no clone
    deadline = time.monotonic() + 30
    while new_processes(before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert new_processes(before) == []
    assert not any(psutil.pid_exists(p["pid"]) for p in points.values())
    assert not accepts_connections(a["scheduler"])
    assert list((project / ".dvc/tmp/exps/clones").iterdir()) == []
