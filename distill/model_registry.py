"""The MLflow model registry: the evaluate stage registers the student's logged model, tagged
with the quality gate's verdict and its reason, and moves the serving alias to it only when it
passed. What it answers (the version, the version that holds the alias after it, or why nothing
was registered) is what distill.gate's verdict line says.

A registration is an operation of the evaluate stage's run like any other: journalled, and
recorded by `distill catch-up` (distill/catchup.py) when the store failed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from distill.config import BaseRegistryConfig
from distill.run_logging import TAG_MODEL_URI
from distill.tracking import StageRun

log = logging.getLogger(__name__)


def register_student(run: StageRun, student_run: str | None, registry: BaseRegistryConfig, passed: bool,
                     reason: str = "") -> dict:
    """Register the student's model, tagged with the quality gate's verdict (a task's gate, e.g.
    evaluation.passes_gate) and `reason`; give the new version the alias only if it passed.

    Returns {"registered_version", "gate_passed", "champion_version" (the version holding the alias
    now; None when none does), "unregistered" (why nothing was registered, else None)}. Nothing is
    registered when this evaluate run is not tracked (tracking off now, whatever the checkpoint
    recorded), the student was not, the store failed (the registration then waits in the journal
    with the rest of the run), or the student's logged model has no files (its logging failed).
    """
    if not run.tracked:
        return _unregistered("tracking is off")
    if not student_run:
        return _unregistered("the student's training was not tracked")
    op = {"op": "register", "student_run": student_run, "model_name": registry.model_name,
          "alias": registry.alias, "passed": passed, "reason": reason}
    live = run._log(op, live=lambda: _register_live(op))
    if live is None:
        return _unregistered("the store failed: `distill catch-up` registers it")
    version, holder = live
    if version is None:
        return _unregistered("the student's MLflow model has no files, as its logging failed")
    return {"registered_version": version, "gate_passed": passed, "champion_version": holder, "unregistered": None}


def _unregistered(why: str) -> dict:
    return {"registered_version": None, "gate_passed": None, "champion_version": None, "unregistered": why}


def _register_live(op: dict) -> tuple[str, str | None]:
    """Register now; the new version, and the version that holds the alias after it."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    version = _register(op)
    if version is None or op["passed"]:
        return version, version
    try:
        return version, str(MlflowClient().get_model_version_by_alias(op["model_name"], op["alias"]).version)
    except MlflowException:  # no version has the alias yet
        return version, None


def _register(op: dict) -> str | None:
    """Register the student run's logged model; None (and one warning) when it has no model files."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    name, student_run = op["model_name"], op["student_run"]
    model_uri = client.get_run(student_run).data.tags.get(TAG_MODEL_URI, f"runs:/{student_run}/model")
    if not has_model_files(model_uri):
        log.warning("%s: not registered: %s (the student's MLflow model) has no files, as its logging failed "
                    "(train_student said why); nothing could serve it", name, model_uri)
        return None
    version = mlflow.register_model(model_uri, name).version
    client.set_model_version_tag(name, version, "quality_gate", "passed" if op["passed"] else "failed")
    if op.get("reason"):  # a journal written before reasons were recorded has none
        client.set_model_version_tag(name, version, "quality_gate_reason", op["reason"])
    if op["passed"]:
        client.set_registered_model_alias(name, op["alias"], version)
    return version


def has_model_files(model_uri: str) -> bool:
    """Whether the logged model at `model_uri` has its MLmodel file. A logging that failed leaves
    a logged model with no files, which MLflow would still register (and nothing could serve)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        found = mlflow.artifacts.list_artifacts(artifact_uri=model_uri)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise  # the store's failure, not the model's
        return False
    return any(Path(entry.path).name == "MLmodel" for entry in found)
