"""The pipeline logging to an MLflow tracking server backed by PostgreSQL, on loopback.

PostgreSQL (Debian's `postgresql` package) and `mlflow server` with a served artifact
root are started on 127.0.0.1 for the test and stopped by their pids afterwards. The
pipeline is pointed at the server by MLFLOW_TRACKING_URI alone.
"""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import git_commit, tiny_params, write_params
from distill import data
from distill import checkpoint
from servers import loopback_postgres, mlflow_server, postgres_bin_dir
from test_tracking import STAGES, assert_evaluate_children, repro, stage_runs


@pytest.fixture
def tracking_server(tmp_path: Path):
    """An MLflow server on a fresh PostgreSQL database, both on 127.0.0.1; yields (uri, artifact dir)."""
    if postgres_bin_dir() is None:
        pytest.skip("postgresql server binaries (initdb, pg_ctl) not found; "
                    ".ci/run installs Debian's postgresql package")
    artifacts = tmp_path / "server-artifacts"
    with loopback_postgres("mlflow") as db_uri, mlflow_server(db_uri, artifacts, tmp_path / "mlflow-server.log") as uri:
        yield uri, artifacts


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_the_pipeline_logs_runs_artifacts_and_the_registered_model_to_a_postgresql_backed_server(
        project, tracking_server, tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    uri, artifacts = tracking_server
    params = tiny_params(**{"tracking.enabled": True})
    write_params(project / "params.yaml", params)
    git_commit(project, "tracking on")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the only change: the stages read it
    repro(project)

    # nothing went to the project's own store
    assert not (project / "mlflow.db").exists() and not (project / "mlruns").exists()

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(params["tracking"]["experiment"])
    assert experiment is not None and experiment.artifact_location.startswith("mlflow-artifacts:")
    runs = stage_runs(client, experiment.experiment_id)
    assert set(runs) == STAGES and all(len(r) == 1 for r in runs.values())
    first = {stage: r[0] for stage, r in runs.items()}
    assert all(r.info.status == "FINISHED" for r in first.values())
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`distill.kind` = 'pipeline'")
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in first.values())

    # metrics: per-epoch histories and the evaluate children under the same keys
    assert [m.step for m in client.get_metric_history(first["train_teacher"].info.run_id, "val_accuracy")] \
        == list(range(1, params["teacher"]["epochs"] + 1))
    assert {"train_kd", "train_ce", "train_loss", "val_accuracy", "best_val_accuracy"} \
        <= set(first["train_student"].data.metrics)
    assert "gap_closed" in first["evaluate"].data.metrics
    assert_evaluate_children(client, experiment.experiment_id, first["evaluate"].info.run_id)

    # artifacts went through the server into its artifact destination, and come back from it
    student_run = first["train_student"].info.run_id
    assert first["train_student"].info.artifact_uri.startswith("mlflow-artifacts:")
    downloaded = Path(client.download_artifacts(student_run, "checkpoint/student.pt", str(tmp_path / "dl")))
    assert sha256(downloaded) == sha256(project / "models/student.pt")
    assert [p for p in artifacts.rglob("student.pt")], "the checkpoint is not in the server's artifact destination"
    assert {"compare.md", "metrics.json"} <= {a.path for a in client.list_artifacts(first["evaluate"].info.run_id)}

    # the registered model: version 1 passed the gate and carries the alias; its files,
    # downloaded through the server, predict what the DVC checkpoint predicts
    registry = params["registry"]
    version = client.get_model_version_by_alias(registry["model_name"], registry["alias"])
    assert str(version.version) == "1" and version.tags["quality_gate"] == "passed"
    assert version.run_id == student_run
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{registry['model_name']}@{registry['alias']}",
        dst_path=str(tmp_path / "model"), tracking_uri=uri, registry_uri=uri)
    loaded = mlflow.pyfunc.load_model(local)
    test = data.read_split(project / "data/prepared", "test")
    model, _ = checkpoint.load(project / "models/student.pt")
    with torch.inference_mode():
        expected = model(torch.from_numpy(test.x)).numpy()
    np.testing.assert_allclose(np.asarray(loaded.predict(test.x)), expected, rtol=1e-5, atol=1e-5)
