"""Writing a stage's run to MLflow: its place in the pipeline's group, its start, and each
operation `tracking.StageRun` journals, applied to the active run live or when catching up.

Grouping: the stages of one pipeline execution are nested under one parent run
tagged `distill.pipeline_run`. The id comes from DISTILL_PIPELINE_RUN (the Prefect
flow sets it to its flow-run id); under a plain `dvc repro` it is derived from the
`dvc` process that runs the stages, so every stage of that command shares it.

The operations (dicts with an "op" key) are the journal's vocabulary: params, metrics,
tags, artifact, model, dataset, child. A model is logged as an MLflow model (torch.export; a model
of token ids with its tokenizer in front, distill/served_text.py); a child run is nested under the
stage's (a classifier's evaluate has one per model, which line its three models up in MLflow's
compare view). What a stage logs is its task's to say: nothing here knows a task.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distill.io import process_id, process_running
from distill.store import _experiment_id, _retry_locked, _store_lock, check_reachable

log = logging.getLogger(__name__)

TAG_PIPELINE_RUN = "distill.pipeline_run"
TAG_STAGE = "distill.stage"
TAG_MODEL_URI = "distill.model_uri"
TAG_PROCESS = "distill.process"  # host:pid:start time of the process that runs the stage


def this_process() -> str:
    """This process as TAG_PROCESS names it."""
    import socket

    pid, started = process_id()
    return f"{socket.gethostname()}:{pid}:{started:.2f}"


def process_gone(tag: str) -> bool:
    """Whether the process a TAG_PROCESS value names (on this host) is no longer running."""
    import socket

    parts = tag.split(":")
    if len(parts) != 3 or parts[0] != socket.gethostname():
        return False  # untagged, or another machine's process: not for this one to judge
    try:
        return not process_running(int(parts[1]), float(parts[2]))
    except ValueError:
        return True


def close_orphans(experiment_id: str) -> list[str]:
    """End KILLED the experiment's runs still RUNNING whose process (on this host) has gone: a stage
    killed outright (SIGKILL, a power cut) cannot end its own run. Returns their ids."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    running = client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=200)
    gone = [run for run in running if process_gone(run.data.tags.get(TAG_PROCESS, ""))]
    for run in gone:
        client.set_terminated(run.info.run_id, "KILLED")
        log.warning("MLflow run %s (%s) was left running by a process that has gone: ended KILLED",
                    run.info.run_id[:8], run.data.tags.get(TAG_STAGE, run.info.run_name))
    return [run.info.run_id for run in gone]


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


def _start(root: Path, uri: str, experiment: str, stage: str, pipeline_id: str, tags: dict) -> tuple[str, str]:
    """Connect, find or create the experiment and the pipeline's parent run, start the stage's run.
    Against the project's SQLite store this holds a file lock, so writers starting at once
    (sweep points, two checkouts) neither race on creating the store or the experiment nor
    fail on "database is locked"."""
    import mlflow

    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    with _store_lock(uri):
        experiment_id = _retry_locked(lambda: _experiment_id(experiment, root, uri))
        _retry_locked(lambda: close_orphans(experiment_id))
        parent_id = _retry_locked(lambda: _parent_run(experiment_id, pipeline_id))
        active = _retry_locked(lambda: mlflow.start_run(experiment_id=experiment_id, run_name=stage,
                                                         parent_run_id=parent_id, nested=True, tags=tags))
    return experiment_id, active.info.run_id


def _end_run(status: str) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.end_run(status)


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


def apply(op: dict, model=None, load_model: Callable[[str], Any] | None = None) -> Any:
    """Record one journal operation on the active MLflow run (live, or when catching up).
    A "model" op logs `model`, or the one `load_model` rebuilds from the op's checkpoint.
    (A "register" op is the model registry's: distill.model_registry records it.)"""
    import mlflow

    kind = op["op"]
    if kind == "params":
        mlflow.log_params(op["values"])
    elif kind == "metrics":
        mlflow.log_metrics(op["values"], step=op.get("step"))
    elif kind == "tags":
        mlflow.set_tags(op["values"])
    elif kind == "artifact":
        if Path(op["path"]).is_dir():
            mlflow.log_artifacts(op["path"], op["folder"])
        else:
            mlflow.log_artifact(op["path"], op["folder"])
    elif kind == "model":
        if model is None and load_model is None:
            raise ValueError("a model operation needs the model, or a loader for its checkpoint")
        model = model if model is not None else load_model(op["checkpoint"])
        mlflow.set_tag(TAG_MODEL_URI, _log_text_model(model, op["example"], op["text"]) if op.get("text")
                       else _log_torch_model(model, op["example"]))
    elif kind == "dataset":
        _log_dataset(op)
    elif kind == "child":
        _log_child(op)
    else:
        raise ValueError(f"unknown tracking operation {kind!r}")
    return None


def _model_or_warn(op: dict, model, stage: str) -> None:
    """Log the model; a model that torch cannot export is the model's problem, not the store's:
    warn and go on recording (the checkpoint artifact is there either way)."""
    from mlflow.exceptions import MlflowException

    try:
        apply(op, model)
    except (MlflowException, OSError):
        raise  # the store's: the run goes offline
    except Exception as exc:
        if type(exc).__module__.split(".")[0] in ("sqlalchemy", "requests", "urllib3"):
            raise
        log.warning("%s: the MLflow model was not logged (%s: %s); the checkpoint artifact is", stage,
                    type(exc).__name__, str(exc).splitlines()[0][:160] if str(exc) else "")


def _log_torch_model(model, example: list) -> str:
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    x = np.asarray(example)
    x = x.astype(np.int64) if np.issubdtype(x.dtype, np.integer) else x.astype(np.float32)  # token ids stay ids
    with torch.inference_mode():
        output = model(torch.from_numpy(x)).numpy()
    info = mlflow.pytorch.log_model(
        model, name="model", signature=infer_signature(x, output), input_example=x,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"], serialization_format="pt2",
    )
    return info.model_uri


def _log_text_model(model, example: list, text: dict) -> str:
    """A model of token ids as distill/served_text.py serves it: the tokenizer in front, so that a
    request may be raw text. The model is exported by torch.export's strict (Dynamo) tracer, which
    keeps the data-dependent length a TextCNN cuts each batch to (the non-strict tracer
    mlflow.pytorch uses refuses it: GuardOnDataDependentSymNode), the batch size left free; the
    tokenizer's own files are saved beside it (not the rest of a teacher's folder)."""
    import tempfile

    import mlflow
    import torch
    import transformers

    ids = torch.as_tensor(example, dtype=torch.int64)  # (N, max_length)
    tokenizer = transformers.AutoTokenizer.from_pretrained(text["tokenizer"], local_files_only=True)
    with tempfile.TemporaryDirectory() as tmp:
        program = torch.export.export(model.eval(), (ids,), strict=True,
                                      dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        torch.export.save(program, Path(tmp) / "model.pt2")
        tokenizer.save_pretrained(Path(tmp) / "tokenizer")
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(Path(__file__).with_name("served_text.py")),
            input_example=tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True),
            artifacts={"model": str(Path(tmp) / "model.pt2"), "tokenizer": str(Path(tmp) / "tokenizer")},
            model_config={k: text[k] for k in ("max_length", "pad_id", "class_names")},
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}",
                              "pandas"])
    return info.model_uri


def _log_dataset(op: dict) -> None:
    import warnings

    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # "can be interpreted in multiple ways": all are local files
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(Path(op["path"]).as_uri())
    mlflow.log_input(MetaDataset(source, name=op["name"], digest=op["digest"]), context=op["context"])


def _log_child(op: dict) -> None:
    import mlflow

    experiment_id = mlflow.active_run().info.experiment_id
    with mlflow.start_run(run_name=op["name"], nested=True, experiment_id=experiment_id, tags=op["tags"]):
        mlflow.log_params(op["params"])
        mlflow.log_metrics(op["metrics"])
