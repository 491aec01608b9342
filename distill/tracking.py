"""MLflow tracking: one run per executed stage, grouped per pipeline execution.

A stage records everything through its StageRun (`stage_run` opens it), which journals each
operation and applies it to the live run (distill/run_logging.py) in the store the project
uses (distill/store.py). When the store fails, the stage carries on and its journal waits
under .mlflow-pending/ for `distill catch-up` (distill/catchup.py).

A stage DVC skips logs nothing; the run id of the stage that made an artifact
travels inside the artifact (checkpoint dict, soft-label provenance) and in a
small receipt file, so downstream runs link to the exact upstream run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from distill import journal
from distill.config import TrackingConfig
from distill.errors import UserError
from distill.io import git_head, write_json
from distill.run_logging import (TAG_PIPELINE_RUN, TAG_PROCESS, TAG_STAGE, _model_or_warn, _start, apply, flatten,
                                 pipeline_run_id, this_process)
from distill.store import (HTTP_SETTINGS, TrackingFailure, _os_reason, _retry_locked, describe_failure, project_root,
                           tracking_uri)

log = logging.getLogger(__name__)
STEP_KEYS = ("epoch", "step")  # what a scored row's step is called, by the task that trains


class StageRun:
    """The MLflow run of one executed stage (or a no-op stand-in when tracking is off).

    Everything a stage records goes through `_log` as an operation ("op"): applied to the
    live run when the store works, and always kept in a journal. When the store fails (at
    the start or mid-run) the run goes offline: nothing more is sent, the stage carries on,
    and at its end the journal is saved under .mlflow-pending/ with copies of the files it
    names, for `catch_up` to record later. A failure never touches the stage's outputs.

    It knows no task: what a stage records (which metrics, which files, whether a model) is
    the task's to say, through these generic calls (distill/classification.py,
    distill/language_model.py).
    """

    def __init__(self, run_id: str | None, pipeline_id: str, uri: str = "", stage: str = "",
                 tracked: bool | None = None, on_error: str = "warn"):
        self.run_id = run_id
        self.pipeline_id = pipeline_id
        self.uri, self.stage = uri, stage
        self.journal: list[dict] = []
        self.failure: str | None = None
        # False: tracking off, nothing is journalled either (default: whether there is a run)
        self.tracked = run_id is not None if tracked is None else tracked
        self.on_error = on_error  # fail: the stage's caller reports the failure, so no warning here

    def fail(self, exc: BaseException) -> None:
        """Go offline: remember why, say so once; later ops are only journalled."""
        if self.failure is None:
            own = isinstance(exc, (TrackingFailure, UserError))  # already one sentence
            self.failure = str(exc) if own else describe_failure(exc, self.uri)
            if self.on_error == "warn":
                log.warning("%s: tracking failed, the stage goes on and its record waits for `distill catch-up`: %s",
                        self.stage, self.failure)

    def _log(self, op: dict, live: Callable[[], Any] | None = None) -> Any:
        if not self.tracked:
            return None
        self.journal.append(op)
        if self.failure is not None:
            return None
        try:
            return _retry_locked(live or (lambda: apply(op)))
        except Exception as exc:  # any store error: a database, a server, a file system
            self.fail(exc)
            return None

    def log_score(self, row: dict[str, float]) -> None:
        """One val row of a training, at the step the row carries: its "epoch" (a classifier's
        rows) or its "step" (a language model's optimizer step); the training loop's callback."""
        key = next((k for k in STEP_KEYS if k in row), None)
        if key is None:
            raise ValueError(f"a scored row names its step by one of {STEP_KEYS}; this one has {sorted(row)}")
        self._log({"op": "metrics", "values": {k: float(v) for k, v in row.items() if k != key},
                   "step": int(row[key])})

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self._log({"op": "metrics", "values": {k: float(v) for k, v in metrics.items()
                                               if isinstance(v, (int, float))}})

    def log_params(self, params: dict) -> None:
        self._log({"op": "params", "values": {k: str(v) for k, v in flatten(params).items()}})

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._log({"op": "tags", "values": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        """A file, or a folder's files under `folder` (default: the folder's name)."""
        path = Path(path)
        self._log({"op": "artifact", "path": str(path.resolve()),
                   "folder": folder if folder is not None or not path.is_dir() else path.name})

    def log_model(self, model, example, checkpoint: str | Path, text: dict | None = None) -> None:
        """Log a torch model as an MLflow model (signature, input example, explicit requirements)
        and tag the run with its URI; a catch-up rebuilds it from `checkpoint`. With `text` (a model
        of token ids: its "tokenizer" folder, "max_length", "pad_id", "class_names") the model is
        logged with the tokenizer in front, and serves raw text (distill/served_text.py)."""
        op = {"op": "model", "checkpoint": str(Path(checkpoint).resolve()), "example": example.tolist()}
        if text is not None:
            op["text"] = text
        self._log(op, live=lambda: _model_or_warn(op, model, self.stage))

    def log_dataset(self, path: Path, name: str, digest: str, context: str) -> None:
        """Record a file as a dataset input of this run (source path and digest, not the data)."""
        self._log({"op": "dataset", "path": str(Path(path).resolve()), "name": name, "digest": digest[:16],
                   "context": context})

    def log_child(self, name: str, params: dict, metrics: dict[str, float], tags: dict[str, Any]) -> None:
        """A run nested under this one (evaluate's one per model), tagged with this run's stage and
        pipeline group besides `tags`: `params` flattened, `metrics`."""
        tags = {TAG_STAGE: self.stage} | {k: str(v) for k, v in tags.items()} | {TAG_PIPELINE_RUN: self.pipeline_id}
        self._log({"op": "child", "name": name, "tags": tags,
                   "params": {k: str(v) for k, v in flatten(params).items()},
                   "metrics": {k: float(v) for k, v in metrics.items()}})


@contextmanager
def stage_run(stage: str, cfg: TrackingConfig, params: dict, receipt: str | Path | None,
              inputs_sha256: Callable[[], str] | None = None) -> Iterator[StageRun]:
    """Open the MLflow run of an executed stage, nested under its pipeline's parent run.

    Logs `params` flattened and the lineage tags, with `dvc.inputs_sha256` from `inputs_sha256`
    (the stage's fingerprint of its DVC inputs, stages/common.py; called only when the run is
    recorded, as hashing the inputs reads them); on success writes `receipt` (run ids)
    atomically. With tracking disabled it yields a no-op StageRun and still writes the
    receipt, with run_id null. A store that fails (at the start or mid-run) costs no
    work: with `tracking.on_error: warn` the stage completes, says so in one line, and
    its receipt names the journal `catch_up` records later; with `fail` it stops with the
    sentence (exit 2) at the start, or after its outputs are written.
    """
    pipeline_id = pipeline_run_id()
    if not cfg.enabled:
        yield StageRun(None, pipeline_id)
        _write_receipt(receipt, {"stage": stage, "run_id": None, "experiment_id": None, "pipeline_run": pipeline_id})
        return
    for key, value in HTTP_SETTINGS.items():
        os.environ.setdefault(key, value)
    root = project_root()
    uri = tracking_uri(root)
    run = StageRun(None, pipeline_id, uri, stage, tracked=True, on_error=cfg.on_error)
    tags = {TAG_STAGE: stage, TAG_PIPELINE_RUN: pipeline_id, "git.commit": git_head(root) or "unknown",
            TAG_PROCESS: this_process()}
    if inputs_sha256 is not None:
        tags["dvc.inputs_sha256"] = inputs_sha256()
    experiment_id = None
    try:
        experiment_id, run.run_id = _start(root, uri, cfg.experiment, stage, pipeline_id, tags)
    except Exception as exc:  # the store is unusable before any work: a corrupt file, a dead server, ...
        run.fail(exc)
        if cfg.on_error == "fail":
            raise UserError(run.failure) from None
    run.log_params(params)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (stages/common.py): the run was stopped, not failed
        status = "KILLED"
        raise
    finally:
        _finish(run, status)
    waiting = None
    if run.failure:
        try:
            waiting = journal.write(root, run, cfg.experiment, tags)
        except OSError as exc:  # a full or read-only project: the outputs are whole, the record is lost
            log.warning("%s: the record could not be kept for catch-up either (%s)", stage, _os_reason(exc, str(exc)))
    _write_receipt(receipt, {"stage": stage, "run_id": run.run_id, "experiment_id": experiment_id,
                             "pipeline_run": pipeline_id, "recorded": run.failure is None,
                             "tracking_error": run.failure, "pending": waiting})
    if run.failure and cfg.on_error == "fail":
        raise UserError(f"{run.failure} (outputs saved; `distill catch-up` records this run from {waiting}; "
                        "DVC reruns a failed stage, or `dvc commit` keeps its outputs)")



def _finish(run: StageRun, status: str) -> None:
    """Mark the live run ended in the store (retried by run id while SQLite is locked), and take it
    off MLflow's stack of active runs in any case (which also stops MLflow's exit hook ending it)."""
    import mlflow

    if not run.run_id:
        return
    if run.failure is None:
        try:
            _retry_locked(lambda: mlflow.MlflowClient().set_terminated(run.run_id, status))
        except Exception as exc:
            run.fail(exc)
    try:
        mlflow.end_run("FAILED" if run.failure else status)  # pops the run, then (again) marks it
    except Exception:
        pass


def _write_receipt(receipt: str | Path | None, content: dict) -> None:
    if receipt is not None:
        write_json(receipt, content)
