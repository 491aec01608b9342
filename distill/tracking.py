"""MLflow tracking: one run per executed stage, grouped per pipeline execution.

Where runs go: MLFLOW_TRACKING_URI when set (a server), else a SQLite store and an
artifact root inside the project (mlflow.db, mlruns/; git-ignored), as absolute
paths, so the private clones a sweep runs its points in (under .dvc/tmp/exps/) log to the same store.

Grouping: the stages of one pipeline execution are nested under one parent run
tagged `distill.pipeline_run`. The id comes from DISTILL_PIPELINE_RUN (the Prefect
flow sets it to its flow-run id); under a plain `dvc repro` it is derived from the
`dvc` process that runs the stages, so every stage of that command shares it.

A stage DVC skips logs nothing; the run id of the stage that made an artifact
travels inside the artifact (checkpoint dict, soft-label provenance) and in a
small receipt file, so downstream runs link to the exact upstream run.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from distill.config import DISTILLATION_KEYS, RegistryConfig, TrackingConfig
from distill.errors import UserError
from distill.io import git_head, tree_sha256, write_json

TAG_PIPELINE_RUN = "distill.pipeline_run"
TAG_STAGE = "distill.stage"
TAG_MODEL_URI = "distill.model_uri"
# The MLflow UI opens an experiment of this kind on its runs (training), not on the GenAI overview.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
# Fail fast against an unreachable server instead of retrying for minutes (set when a run starts).
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def project_root(cwd: Path | None = None) -> Path:
    """The project directory, also from inside a sweep point's clone or a `dvc exp run --temp` copy under .dvc/tmp/exps/."""
    cwd = (cwd or Path.cwd()).resolve()
    parts = cwd.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return cwd


def tracking_uri(root: Path) -> str:
    """MLFLOW_TRACKING_URI, or the embedded SQLite store of the project at `root`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def artifact_root(root: Path, uri: str) -> str | None:
    """Where the embedded SQLite store keeps artifacts (root/mlruns); None for a server, which decides."""
    return (root / "mlruns").as_uri() if uri.startswith("sqlite:") else None


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise a UserError within `timeout` seconds when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it, or unset "
            "MLFLOW_TRACKING_URI to use the project's own store"
        ) from None


def pipeline_run_id() -> str:
    """The id shared by the stages of one pipeline execution (see the module docstring)."""
    if os.environ.get("DISTILL_PIPELINE_RUN"):
        return os.environ["DISTILL_PIPELINE_RUN"]
    import psutil

    proc = psutil.Process()
    while proc is not None:
        try:
            cmd = proc.cmdline()
        except psutil.Error:
            break
        if any(Path(c).name == "dvc" for c in cmd[:2]):
            return f"dvc-{proc.pid}-{int(proc.create_time())}"
        proc = proc.parent()
    return f"standalone-{os.getpid()}-{int(time.time())}"


def flatten(params: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (MLflow logs the values in their string form)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


class StageRun:
    """The MLflow run of one executed stage (or a no-op stand-in when tracking is off)."""

    def __init__(self, run_id: str | None, pipeline_id: str):
        self.run_id = run_id
        self.pipeline_id = pipeline_id

    def log_epoch(self, row: dict[str, float]) -> None:
        if self.run_id:
            import mlflow

            step = int(row["epoch"])
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=step)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        if self.run_id:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.run_id:
            import mlflow

            mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_model(self, model, example) -> str | None:
        """Log a torch model (signature, input example, explicit requirements); return its URI."""
        if not self.run_id:
            return None
        import mlflow
        import torch
        from mlflow.models import infer_signature

        with torch.inference_mode():
            output = model(torch.from_numpy(example)).numpy()
        info = mlflow.pytorch.log_model(
            model, name="model", signature=infer_signature(example, output), input_example=example,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"], serialization_format="pt2",
        )
        return info.model_uri

    def log_training(self, result: dict, checkpoint: str | Path, mlflow_model: bool = False) -> None:
        """Final metrics of a training step's result, and its checkpoint file as an artifact.

        With `mlflow_model` (the student, which the registry serves) the model is also
        logged as an MLflow model (torch.export, about 3 s); the teacher and the baseline
        are compared by their metrics and keep only the checkpoint.
        """
        self.log_metrics({k: result[k] for k in ("best_val_accuracy", "best_epoch", "parameters")})
        if self.run_id:
            import mlflow

            mlflow.log_artifact(str(checkpoint), "checkpoint")
        if mlflow_model:
            self.set_tags({TAG_MODEL_URI: self.log_model(result["model"], result["example"])})

    def log_dataset(self, path: Path, name: str, digest: str, context: str) -> None:
        """Record a file as a dataset input of this run (source path and digest, not the data)."""
        if self.run_id:
            import warnings

            import mlflow
            from mlflow.data.dataset_source_registry import resolve_dataset_source
            from mlflow.data.meta_dataset import MetaDataset

            with warnings.catch_warnings():  # "can be interpreted in multiple ways": all are local files
                warnings.simplefilter("ignore", UserWarning)
                source = resolve_dataset_source(Path(path).resolve().as_uri())
            mlflow.log_input(MetaDataset(source, name=name, digest=digest[:16]), context=context)


@contextmanager
def stage_run(stage: str, cfg: TrackingConfig, params: dict, receipt: str | Path | None) -> Iterator[StageRun]:
    """Open the MLflow run of an executed stage, nested under its pipeline's parent run.

    Logs `params` flattened and the lineage tags; on success writes `receipt`
    (run ids) atomically. With tracking disabled it yields a no-op StageRun and
    still writes the receipt, with run_id null.
    """
    pipeline_id = pipeline_run_id()
    if not cfg.enabled:
        yield StageRun(None, pipeline_id)
        _write_receipt(receipt, stage, None, None, pipeline_id)
        return
    import mlflow

    for key, value in HTTP_SETTINGS.items():
        os.environ.setdefault(key, value)
    root = project_root()
    uri = tracking_uri(root)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    experiment_id = _experiment_id(cfg.experiment, root, uri)
    parent_id = _parent_run(experiment_id, pipeline_id)
    tags = {TAG_STAGE: stage, TAG_PIPELINE_RUN: pipeline_id, "git.commit": git_head(root) or "unknown",
            "dvc.inputs_sha256": stage_inputs_sha256(stage, params)}
    with mlflow.start_run(experiment_id=experiment_id, run_name=stage, parent_run_id=parent_id,
                          nested=True, tags=tags) as run:
        mlflow.log_params(flatten(params))
        yield StageRun(run.info.run_id, pipeline_id)
    _write_receipt(receipt, stage, run.info.run_id, experiment_id, pipeline_id)


def stage_inputs_sha256(stage: str, params: dict, dvc_yaml: Path = Path("dvc.yaml")) -> str:
    """A fingerprint of what DVC records as the stage's inputs: its deps (as listed in
    dvc.yaml, hashed by content) and its params. Equal fingerprints, equal dvc.lock deps."""
    import hashlib

    import yaml

    deps = yaml.safe_load(dvc_yaml.read_text())["stages"][stage]["deps"] if dvc_yaml.is_file() else []
    deps = [resolve(dep, dvc_yaml.parent / "params.yaml") for dep in deps]
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    for dep in deps:
        digest.update(dep.encode())
        digest.update(tree_sha256(dep).encode() if Path(dep).exists() else b"missing")
    return digest.hexdigest()


def resolve(text: str, params_file: Path) -> str:
    """`text` with each ${section.key} of dvc.yaml's templating replaced by its params.yaml value."""
    import re

    import yaml

    if "${" not in text:
        return text
    raw = yaml.safe_load(params_file.read_text()) if params_file.is_file() else {}

    def value(match: re.Match) -> str:
        node = raw
        for part in match.group(1).split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return str(node)

    return re.sub(r"\$\{\s*([\w.]+)\s*\}", value, text)


def _write_receipt(receipt, stage, run_id, experiment_id, pipeline_id) -> None:
    if receipt is not None:
        write_json(receipt, {"stage": stage, "run_id": run_id, "experiment_id": experiment_id,
                             "pipeline_run": pipeline_id})


def _experiment_id(name: str, root: Path, uri: str) -> str:
    import mlflow

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        return mlflow.create_experiment(name, artifact_location=artifact_root(root, uri), tags=EXPERIMENT_TAGS)
    if any(experiment.tags.get(k) != v for k, v in EXPERIMENT_TAGS.items()):
        for key, value in EXPERIMENT_TAGS.items():
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def _parent_run(experiment_id: str, pipeline_id: str) -> str:
    """Find or create the parent run that groups one pipeline execution's stage runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    found = client.search_runs([experiment_id], f"tags.`{TAG_PIPELINE_RUN}` = '{pipeline_id}' "
                                                "and tags.`distill.kind` = 'pipeline'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"pipeline {time.strftime('%Y-%m-%d %H:%M:%S')}",
                            tags={TAG_PIPELINE_RUN: pipeline_id, "distill.kind": "pipeline"})
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def log_evaluation(run: StageRun, result, artifacts: list[Path]) -> None:
    """Evaluate's logging: one child run per model (an evaluation.Evaluation's metrics under the
    same keys, and the model's own config as params, so MLflow's compare view lines up arch,
    widths, temperature and alpha beside the numbers), the gap closed on the stage run, and
    the report files as artifacts (nothing when tracking is off)."""
    if not run.run_id:
        return
    import mlflow

    metrics = result.metrics
    experiment_id = mlflow.active_run().info.experiment_id
    for role, model_run in result.run_ids.items():
        with mlflow.start_run(run_name=f"evaluate {role}", nested=True, experiment_id=experiment_id,
                              tags={TAG_STAGE: "evaluate", "distill.model_role": role,
                                    "distill.model_run_id": str(model_run),
                                    TAG_PIPELINE_RUN: run.pipeline_id}):
            config = dict(result.configs.get(role, {}))
            if role == "baseline":  # trained with the student's config, but no distillation key applies to it
                config = {k: v for k, v in config.items() if k not in DISTILLATION_KEYS}
            mlflow.log_params({"role": role} | flatten(config))
            mlflow.log_metrics({k: float(v) for k, v in metrics[role].items()})
    if metrics.get("gap_closed") is not None:
        run.log_metrics({"gap_closed": metrics["gap_closed"]})
    for path in artifacts:
        if path.is_dir():
            mlflow.log_artifacts(str(path), path.name)
        else:
            mlflow.log_artifact(str(path))


def register_student(run: StageRun, student_run: str | None, registry: RegistryConfig, passed: bool) -> dict:
    """Register the student's model, tagged with the quality gate's verdict (evaluation.passes_gate);
    give the new version the alias only if it passed.

    Returns {"registered_version": ..., "gate_passed": ...}: (None, None) when this evaluate run is
    not tracked (tracking off now, whatever the checkpoint recorded) or the student was not.
    """
    if not run.run_id or not student_run:
        return {"registered_version": None, "gate_passed": None}
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    model_uri = client.get_run(student_run).data.tags.get(TAG_MODEL_URI, f"runs:/{student_run}/model")
    version = mlflow.register_model(model_uri, registry.model_name).version
    client.set_model_version_tag(registry.model_name, version, "quality_gate", "passed" if passed else "failed")
    if passed:
        client.set_registered_model_alias(registry.model_name, registry.alias, version)
    return {"registered_version": version, "gate_passed": passed}
