"""MLflow: grouped stage runs, metric histories, lineage, models, registry, and failure modes."""

import json
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BIN, git_commit, subprocess_env, tiny_params, write_params
from distill import data
from distill import checkpoint
from distill.store import project_root
from distill.tracking import flatten
from stages.common import dvc_deps, stage_inputs_sha256

STAGES = {"prepare", "train_teacher", "soft_labels", "train_student", "train_baseline", "evaluate"}
SAME_KEYS = {"test_accuracy", "nll", "ece", "teacher_agreement", "kl_from_teacher", "entropy", "params",
             "checkpoint_bytes", "latency_ms_b1", "latency_ms_batch"}


def repro(project: Path) -> str:
    result = subprocess.run([str(BIN / "dvc"), "repro"], cwd=project, env=subprocess_env(),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def stage_runs(client, experiment_id) -> dict[str, list]:
    """Stage runs by stage name, newest first (evaluate's per-model child runs excluded)."""
    out: dict[str, list] = {}
    for run in client.search_runs([experiment_id], order_by=["attributes.start_time DESC"], max_results=1000):
        stage = run.data.tags.get("distill.stage")
        if stage and "distill.model_role" not in run.data.tags:
            out.setdefault(stage, []).append(run)
    return out


def assert_evaluate_children(client, experiment_id: str, evaluate_run_id: str) -> None:
    """Evaluate's child runs: teacher, student and baseline, under the same metric keys."""
    children = [r for r in client.search_runs([experiment_id], max_results=1000)
                if "distill.model_role" in r.data.tags]
    assert {c.data.tags["distill.model_role"] for c in children} == {"teacher", "student", "baseline"}
    for child in children:
        assert SAME_KEYS <= set(child.data.metrics)
        assert child.data.tags["mlflow.parentRunId"] == evaluate_run_id


@pytest.mark.slow
def test_mlflow_records_grouped_runs_histories_lineage_models_and_the_gated_registry(project):
    from mlflow import MlflowClient
    import mlflow

    write_params(project / "params.yaml", tiny_params(**{"tracking.enabled": True}))
    git_commit(project, "tracking on")
    repro(project)
    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tiny")
    assert experiment is not None
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs
    runs = stage_runs(client, experiment.experiment_id)
    assert set(runs) == STAGES and all(len(r) == 1 for r in runs.values())
    first = {stage: r[0] for stage, r in runs.items()}

    # grouped: one parent run per pipeline execution, every stage run nested under it
    group = {r.data.tags["distill.pipeline_run"] for r in first.values()}
    assert len(group) == 1
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`distill.kind` = 'pipeline'")
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in first.values())

    # params flattened, git commit tag, per-epoch histories with steps
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    student = first["train_student"]
    assert student.data.params["student.temperature"] == "4.0" and student.data.params["seed"] == "0"
    assert student.data.tags["git.commit"] == head
    assert len(student.data.tags["dvc.inputs_sha256"]) == 64
    history = client.get_metric_history(first["train_teacher"].info.run_id, "val_accuracy")
    assert [m.step for m in history] == list(range(1, 5))  # teacher.epochs = 4
    assert {"train_kd", "train_ce", "train_loss", "val_accuracy"} <= set(student.data.metrics)
    assert len(client.get_metric_history(student.info.run_id, "train_kd")) == 3
    # the baseline's budget is the student's optimizer steps (up to its last whole epoch), shown beside it
    baseline = first["train_baseline"]
    per_epoch = client.get_metric_history(baseline.info.run_id, "step")[0].value
    assert 0 < student.data.metrics["steps"] <= baseline.data.metrics["steps"] < student.data.metrics["steps"] + per_epoch

    # lineage: the student names the teacher run that made its soft labels, and the dataset
    teacher_id = first["train_teacher"].info.run_id
    assert student.data.tags["distill.teacher_run_id"] == teacher_id
    assert student.data.tags["distill.soft_labels_run_id"] == first["soft_labels"].info.run_id
    (dataset_input,) = student.inputs.dataset_inputs
    assert dataset_input.dataset.name == "soft_labels" and len(dataset_input.dataset.digest) == 16
    receipt = json.loads((project / "reports/runs/train_teacher.json").read_text())
    assert receipt["run_id"] == teacher_id

    # evaluate: teacher, student and baseline under the same metric keys, each with its own config as params
    assert_evaluate_children(client, experiment.experiment_id, first["evaluate"].info.run_id)
    children = {r.data.tags["distill.model_role"]: r.data.params for r in client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{first['evaluate'].info.run_id}'")}
    assert children["student"]["temperature"] == "4.0" and children["student"]["arch"] == "mlp"
    assert children["teacher"]["hidden"] == "[64]" and "temperature" not in children["teacher"]
    assert children["baseline"]["role"] == "baseline" and "temperature" not in children["baseline"]
    artifacts = {a.path for a in client.list_artifacts(first["evaluate"].info.run_id)}
    assert {"compare.md", "metrics.json", "reliability", "report.html", "figures"} <= artifacts
    figures = {a.path for a in client.list_artifacts(first["evaluate"].info.run_id, "figures")}
    assert {f"figures/{name}.png" for name in ("tradeoff", "training", "confusion", "reliability")} == figures
    # every training run keeps its checkpoint; only the student is an MLflow model (the registry serves it)
    for stage, name in (("train_teacher", "teacher"), ("train_baseline", "baseline"), ("train_student", "student")):
        run_id = first[stage].info.run_id
        assert f"checkpoint/{name}.pt" in {a.path for a in client.list_artifacts(run_id, "checkpoint")}
        assert ("distill.model_uri" in client.get_run(run_id).data.tags) == (name == "student")

    # registry: the gate (min accuracy 0) passes, so version 1 has the alias; the model
    # loaded by URI predicts what the DVC checkpoint predicts
    version = client.get_model_version_by_alias("tiny-student", "champion")
    assert str(version.version) == "1" and version.tags["quality_gate"] == "passed"
    assert "Registry: champion moves to version 1: accuracy " in (project / "reports/compare.md").read_text()
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pyfunc.load_model("models:/tiny-student@champion")
    test = data.read_split(project / "data/prepared", "test")
    model, _ = checkpoint.load(project / "models/student.pt")
    with torch.inference_mode():
        expected = model(torch.from_numpy(test.x)).numpy()
    np.testing.assert_allclose(np.asarray(loaded.predict(test.x)), expected, rtol=1e-5, atol=1e-5)

    # a no-op repro adds no run
    count = len(client.search_runs([experiment.experiment_id], max_results=1000))
    repro(project)
    assert len(client.search_runs([experiment.experiment_id], max_results=1000)) == count

    # a student-only change adds runs for train_student and evaluate, linked to the old teacher run
    write_params(project / "params.yaml", tiny_params(**{"tracking.enabled": True, "student.temperature": 2.0}))
    repro(project)
    runs = stage_runs(client, experiment.experiment_id)
    assert {s for s, r in runs.items() if len(r) == 2} == {"train_student", "evaluate"}
    assert runs["train_student"][0].data.tags["distill.teacher_run_id"] == teacher_id

    # a student that fails the gate is registered without the alias
    write_params(project / "params.yaml", tiny_params(**{"tracking.enabled": True, "student.temperature": 2.0,
                                                         "registry.min_test_accuracy": 1.0}))
    repro(project)
    latest = client.get_model_version("tiny-student", "3")
    assert latest.tags["quality_gate"] == "failed" and not latest.aliases
    reason = latest.tags["quality_gate_reason"]  # the check it failed, as compare.md says it
    assert reason.startswith("accuracy ") and reason.endswith(" < 1")
    assert (f"Registry: champion stays on version 2: {reason} (version 3 registered without it)"
            in (project / "reports/compare.md").read_text())
    assert str(client.get_model_version_by_alias("tiny-student", "champion").version) == "2"


@pytest.mark.timed
def test_an_unreachable_tracking_server_is_a_clear_error_within_seconds(project):
    write_params(project / "params.yaml", tiny_params(**{"tracking.enabled": True, "tracking.on_error": "fail"}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the with block ends
    env = subprocess_env() | {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    start = time.monotonic()
    result = subprocess.run([str(BIN / "python"), "-m", "stages.prepare", "--out", "data/prepared"],
                            cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 30
    assert result.returncode == 2
    assert f"127.0.0.1:{port} is unreachable" in result.stderr and "Traceback" not in result.stderr
    assert not (project / "data/prepared").exists()


def test_the_store_is_found_from_inside_a_dvc_experiment_temp_copy(tmp_path):
    assert project_root(tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpab12") == tmp_path / "repo"
    assert project_root(tmp_path / "repo") == tmp_path / "repo"


def test_params_are_flattened_with_dotted_keys():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x"}) == {"a.b": 1, "a.c.d": [1, 2], "e": "x"}


def test_the_inputs_fingerprint_follows_deps_and_params(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("dvc.yaml").write_text("stages:\n  s:\n    cmd: x\n    deps: [a.txt]\n")
    Path("a.txt").write_text("one")
    first = stage_inputs_sha256("s", {"p": 1})
    assert stage_inputs_sha256("s", {"p": 1}) == first
    assert stage_inputs_sha256("s", {"p": 2}) != first
    Path("a.txt").write_text("two")
    assert stage_inputs_sha256("s", {"p": 1}) != first


def test_a_templated_dep_is_filled_in_from_params_yaml_as_dvc_does(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("dvc.yaml").write_text("stages:\n  s:\n    cmd: x\n    deps: [a.txt, '${data.path}']\n")
    Path("params.yaml").write_text("data:\n  path: b.txt\n")
    Path("a.txt").write_text("one")
    Path("b.txt").write_text("one")
    assert dvc_deps("s") == ["a.txt", "b.txt"]
    first = stage_inputs_sha256("s", {"p": 1})
    Path("b.txt").write_text("two")
    assert stage_inputs_sha256("s", {"p": 1}) != first


def test_with_tracking_off_evaluate_registers_nothing_even_for_a_student_trained_with_it_on(monkeypatch):
    import mlflow

    from distill.classification_params import RegistryConfig
    from distill.model_registry import register_student
    from distill.tracking import StageRun

    monkeypatch.setattr(mlflow, "register_model", lambda *a, **k: pytest.fail("registered with tracking off"))
    untracked = StageRun(None, "standalone-1")  # the evaluate stage's run with tracking.enabled: false
    assert register_student(untracked, "a" * 32, RegistryConfig(), passed=True) == {
        "registered_version": None, "gate_passed": None, "champion_version": None, "unregistered": "tracking is off"}


def offline_run(stage: str) -> "StageRun":
    """A tracked run whose store is gone: every call is only journalled, so a test reads what it records."""
    from distill.tracking import StageRun

    run = StageRun("run-1", "pipeline-1", stage=stage, tracked=True)
    run.failure = "the store is gone"
    return run


def test_a_scored_row_is_logged_at_the_step_it_names_an_epoch_or_a_step():
    run = offline_run("train_student")
    run.log_score({"epoch": 2, "val_accuracy": 0.5})  # a classifier's row
    run.log_score({"step": 250, "val_bits_per_token": 7.5})  # a language model's
    assert run.journal == [{"op": "metrics", "values": {"val_accuracy": 0.5}, "step": 2},
                           {"op": "metrics", "values": {"val_bits_per_token": 7.5}, "step": 250}]
    with pytest.raises(ValueError, match="names its step"):
        run.log_score({"val_accuracy": 0.5})


def test_a_classifiers_evaluate_logs_a_child_run_per_model_and_the_baseline_without_distillation_keys():
    from types import SimpleNamespace

    from distill.classification import ClassificationTask

    config = {"arch": "mlp", "temperature": 4.0, "alpha": 0.9}
    result = SimpleNamespace(run_ids={"student": "s1", "baseline": "b1"},
                             configs={"student": config, "baseline": config},
                             metrics={"student": {"test_accuracy": 0.9}, "baseline": {"test_accuracy": 0.8},
                                      "gap_closed": 0.5})
    run = offline_run("evaluate")
    ClassificationTask()._log_evaluation(run, result, [])
    children = {op["tags"]["distill.model_role"]: op for op in run.journal if op["op"] == "child"}
    assert children["baseline"]["params"] == {"role": "baseline", "arch": "mlp"}
    assert children["student"]["params"] == {"role": "student", "arch": "mlp", "temperature": "4.0", "alpha": "0.9"}
    assert children["student"]["tags"] == {"distill.stage": "evaluate", "distill.model_role": "student",
                                           "distill.model_run_id": "s1", "distill.pipeline_run": "pipeline-1"}
    assert {"op": "metrics", "values": {"gap_closed": 0.5}} in run.journal
