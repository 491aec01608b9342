"""A broken, busy or vanished MLflow store costs no work: each case run as processes, as a user
runs them. The stage's outputs are whole, the failure is one sentence naming the store, the
receipt says the run was not recorded and where its journal waits, and after the store is
repaired `distill catch-up` records it."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BIN, REPO, dvc, git_commit, subprocess_env, tiny_params, write_params

# A stage as the pipeline's stages use tracking: a run, epoch metrics, an output written, a
# checkpoint artifact. argv: on_error, output folder[, a file to wait on before the last part].
STAGE = """
import sys, time
from pathlib import Path
from distill import tracking
from distill.config import TrackingConfig
from distill.progress import setup_logging
from distill.errors import UserError, report

setup_logging()
out = Path(sys.argv[2])
try:
    with tracking.stage_run("train_teacher", TrackingConfig(experiment="faults", on_error=sys.argv[1]),
                            {"teacher": {"epochs": 3}}, out / "receipt.json") as run:
        for epoch in range(1, 4):
            run.log_score({"epoch": epoch, "val_accuracy": epoch / 4})
        (out / "model.pt").write_bytes(b"weights" * 1000)
        if len(sys.argv) > 3:  # the test breaks the store now
            Path(sys.argv[3]).write_text("ready")
            while Path(sys.argv[3]).exists():
                time.sleep(0.1)
        run.log_metrics({"best_val_accuracy": 0.75})
        run.log_artifact(out / "model.pt", "checkpoint")
except UserError as exc:
    raise SystemExit(report(exc))
"""


def stage(workdir: Path, on_error: str = "warn", env: dict | None = None, wait_file: Path | None = None,
          out: str = "out") -> subprocess.Popen:
    (workdir / out).mkdir(parents=True, exist_ok=True)
    args = [str(BIN / "python"), "-c", STAGE, on_error, out] + ([str(wait_file)] if wait_file else [])
    return subprocess.Popen(args, cwd=workdir, env=(env or subprocess_env()) | {"PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def problem_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines()
            if "MLflow store" in line or "MLflow server" in line or "Traceback" in line]


def catch_up(workdir: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "distill"), "catch-up"], cwd=workdir, env=env or subprocess_env(),
                          capture_output=True, text=True, timeout=300)


def recorded_runs(uri: str, experiment: str = "faults") -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    return [r for r in runs if r.data.tags.get("distill.kind") != "pipeline"]


def assert_waiting(workdir: Path, out: str = "out") -> dict:
    """The receipt says not recorded and names a journal that holds a copy of the checkpoint."""
    receipt = json.loads((workdir / out / "receipt.json").read_text())
    assert receipt["recorded"] is False and receipt["tracking_error"]
    journal = workdir / receipt["pending"]
    assert (journal / "journal.json").is_file()
    assert [p.read_bytes() for p in (journal / "files").rglob("model.pt")] == [b"weights" * 1000]
    return receipt


def assert_caught_up(workdir: Path, uri: str, env: dict | None = None) -> None:
    result = catch_up(workdir, env)
    assert result.returncode == 0, result.stderr
    assert "1 run(s) recorded" in result.stdout
    assert not any((workdir / ".mlflow-pending").glob("*/journal.json"))
    (run,) = [r for r in recorded_runs(uri) if r.data.tags.get("distill.caught_up") == "true"]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [0.25, 0.5, 0.75]
    assert run.data.metrics["best_val_accuracy"] == 0.75 and run.data.params["teacher.epochs"] == "3"
    local = client.download_artifacts(run.info.run_id, "checkpoint/model.pt", str(workdir / "download"))
    assert Path(local).read_bytes() == b"weights" * 1000


def corrupt(db: Path) -> None:
    db.write_bytes(b"this is not an SQLite database\n" * 100)


@pytest.mark.slow
def test_a_corrupt_store_at_the_start_costs_no_work_and_is_caught_up_after_repair(tmp_path):
    corrupt(tmp_path / "mlflow.db")
    code, err = finish(stage(tmp_path, "warn"))
    assert code == 0, err
    (line,) = problem_lines(err)
    assert f"MLflow store {tmp_path / 'mlflow.db'} is not a readable MLflow database" in line
    assert (tmp_path / "out" / "model.pt").read_bytes() == b"weights" * 1000
    assert_waiting(tmp_path)
    (tmp_path / "mlflow.db").rename(tmp_path / "mlflow.db.broken")  # the repair the sentence advises
    assert_caught_up(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_with_on_error_fail_a_corrupt_store_stops_the_stage_in_one_sentence_before_any_work(tmp_path):
    corrupt(tmp_path / "mlflow.db")
    code, err = finish(stage(tmp_path, "fail"))
    assert code == 2
    (line,) = problem_lines(err)
    assert "is not a readable MLflow database" in line and "move" in line
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "model.pt").exists()  # stopped before the work, nothing half-written


@pytest.mark.slow
def test_a_store_corrupted_between_two_stages_of_dvc_repro(built_project):
    project = built_project
    write_params(project / "params.yaml", tiny_params(**{"tracking.enabled": True}))
    git_commit(project, "tracking on")
    dvc(project, "repro", "-f", "-s", "train_baseline")  # recorded
    corrupt(project / "mlflow.db")
    out = dvc(project, "repro", "-f", "-s", "evaluate")
    assert "is not a readable MLflow database" in out and "Traceback" not in out
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert set(metrics) >= {"teacher", "student", "baseline"}  # whole
    receipt = json.loads((project / "reports/runs/evaluate.json").read_text())
    assert receipt["recorded"] is False
    assert "evaluate" not in dvc(project, "status")  # DVC recorded the stage: nothing to recompute
    (project / "mlflow.db").rename(project / "mlflow.db.broken")
    result = catch_up(project)
    assert result.returncode == 0 and "recorded evaluate" in result.stdout, result.stderr
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    (evaluate,) = [r for r in runs if r.data.tags.get("distill.stage") == "evaluate"
                   and "distill.model_role" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == evaluate.info.run_id]
    assert {c.data.tags["distill.model_role"] for c in children} == {"teacher", "student", "baseline"}
    assert children[0].data.metrics["test_accuracy"] == metrics[children[0].data.tags["distill.model_role"]][
        "test_accuracy"]
    assert "report.html" in {a.path for a in client.list_artifacts(evaluate.info.run_id)}


@pytest.mark.slow
def test_four_processes_logging_to_one_fresh_store_at_once_all_record(tmp_path):
    procs = [stage(tmp_path, "fail", out=f"out{i}") for i in range(4)]
    results = [finish(p) for p in procs]
    assert [code for code, _ in results] == [0, 0, 0, 0], [err for _, err in results]
    for i in range(4):
        assert json.loads((tmp_path / f"out{i}" / "receipt.json").read_text())["recorded"] is True
    assert len(recorded_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")) == 4
    assert not (tmp_path / ".mlflow-pending").exists()


def read_only_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write into: chmod for a normal user; for root (which ignores
    modes), a folder of a read-only mount such as /sys."""
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    for candidate in (Path("/sys/kernel"), Path("/proc/sys")):
        try:
            (candidate / "distill-probe").mkdir()
        except OSError:
            return candidate
    pytest.skip("no read-only folder for root on this machine")


@pytest.mark.slow
def test_a_read_only_mlruns_folder_loses_no_work(tmp_path):
    (tmp_path / "mlruns").symlink_to(read_only_folder(tmp_path), target_is_directory=True)
    code, err = finish(stage(tmp_path, "warn"))
    assert code == 0, err
    (line,) = problem_lines(err)
    assert "cannot be written" in line or "read-only" in line
    assert (tmp_path / "out" / "model.pt").read_bytes() == b"weights" * 1000
    assert_waiting(tmp_path)
    (tmp_path / "mlruns").unlink()  # repaired: a writable mlruns/
    (tmp_path / "mlruns").mkdir()
    assert_caught_up(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.mark.slow
def test_a_tracking_server_killed_mid_stage_loses_no_work(tmp_path):
    from servers import mlflow_server

    backend = f"sqlite:///{tmp_path / 'server.db'}"
    ready = tmp_path / "ready"
    with mlflow_server(backend, tmp_path / "artifacts", tmp_path / "server1.log") as uri:
        env = subprocess_env() | {"MLFLOW_TRACKING_URI": uri}
        proc = stage(tmp_path, "warn", env=env, wait_file=ready)
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, finish(proc)
            time.sleep(0.1)
    # the server is gone (the with block stopped it, by its pid); the stage goes on
    ready.unlink()
    code, err = finish(proc)
    assert code == 0, err
    (line,) = problem_lines(err)
    assert f"MLflow server {uri} stopped answering" in line
    receipt = assert_waiting(tmp_path)
    assert receipt["run_id"]  # begun live before the failure
    with mlflow_server(backend, tmp_path / "artifacts", tmp_path / "server2.log") as uri2:
        env = subprocess_env() | {"MLFLOW_TRACKING_URI": uri2}
        assert_caught_up(tmp_path, uri2, env)
        from mlflow import MlflowClient

        old = MlflowClient(tracking_uri=uri2).get_run(receipt["run_id"])
        assert old.info.status == "FAILED" and old.data.tags["distill.superseded_by"]


@pytest.mark.slow
def test_a_copied_project_writes_no_artifact_into_the_original_and_relocate_makes_it_its_own(tmp_path):
    original = tmp_path / "original"
    original.mkdir()
    code, err = finish(stage(original, "warn"))
    assert code == 0 and not problem_lines(err), err
    copy = Path(shutil.copytree(original, tmp_path / "copy"))
    before = sorted(p for p in (original / "mlruns").rglob("*"))
    code, err = finish(stage(copy, "warn"))
    assert code == 0
    (line,) = problem_lines(err)
    assert "distill relocate" in line and str(original / "mlruns") in line
    assert sorted(p for p in (original / "mlruns").rglob("*")) == before  # nothing written there
    result = subprocess.run([str(BIN / "distill"), "relocate"], cwd=copy, env=subprocess_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert_caught_up(copy, f"sqlite:///{copy / 'mlflow.db'}")
    assert sorted(p for p in (original / "mlruns").rglob("*")) == before


def test_catch_up_links_to_the_complete_run_that_replaced_a_half_recorded_one(tmp_path):
    from distill import catchup

    ids = {"old-student": "new-student"}
    register = catchup._replayable({"op": "register", "student_run": "old-student", "model_name": "m",
                                    "alias": "a", "passed": True}, tmp_path, ids)
    child = catchup._replayable({"op": "child", "name": "evaluate student", "params": {}, "metrics": {},
                                 "tags": {"distill.model_run_id": "old-student", "x": "y"}}, tmp_path, ids)
    artifact = catchup._replayable({"op": "artifact", "path": "files/003/model.pt", "folder": "checkpoint"},
                                   tmp_path, ids)
    assert register["student_run"] == "new-student"
    assert child["tags"] == {"distill.model_run_id": "new-student", "x": "y"}
    assert artifact["path"] == str(tmp_path / "files/003/model.pt")


def test_a_model_torch_cannot_export_is_a_warning_not_a_store_failure(tmp_path, monkeypatch, caplog):
    from distill import run_logging, tracking
    from distill.config import TrackingConfig

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_logging, "_log_torch_model", lambda model, example: (_ for _ in ()).throw(
        RuntimeError("torch.export could not trace this model")))
    (tmp_path / "model.pt").write_bytes(b"weights")
    with tracking.stage_run("train_student", TrackingConfig(experiment="faults"), {"p": 1}, "receipt.json") as run:
        run.log_model(object(), __import__("numpy").zeros((2, 3)), tmp_path / "model.pt")
        run.log_metrics({"after": 1.0})
    receipt = json.loads((tmp_path / "receipt.json").read_text())
    assert receipt["recorded"] is True and run.failure is None
    assert "the MLflow model was not logged (RuntimeError: torch.export could not trace" in caplog.text
    (recorded,) = recorded_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert recorded.data.metrics["after"] == 1.0
