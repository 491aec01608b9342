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
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from distill.config import DISTILLATION_KEYS, RegistryConfig, TrackingConfig
from distill.errors import UserError
from distill.io import git_head, tree_sha256, write_json

log = logging.getLogger(__name__)

TAG_PIPELINE_RUN = "distill.pipeline_run"
TAG_STAGE = "distill.stage"
TAG_MODEL_URI = "distill.model_uri"
# The MLflow UI opens an experiment of this kind on its runs (training), not on the GenAI overview.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
# Fail fast against an unreachable server instead of retrying for minutes (set when a run starts).
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def project_root(cwd: Path | None = None) -> Path:
    """The project directory: the outermost DVC repository around `cwd`, so the text pipeline
    (text/, a DVC project of its own inside this one) shares the project's store; also from
    inside a sweep point's clone or a `dvc exp run --temp` copy under .dvc/tmp/exps/."""
    cwd = (cwd or Path.cwd()).resolve()
    parts = cwd.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            cwd = Path(*parts[:i])  # the project (or sub-project) the experiment copy was made from
            break
    repos = [p for p in (cwd, *cwd.parents) if (p / ".dvc").is_dir()]
    return repos[-1] if repos else cwd


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


class TrackingFailure(Exception):
    """The tracking store cannot be used; the message is one sentence: which store, why, what to do."""


def describe_failure(exc: BaseException, uri: str) -> str:
    """One sentence for a store that failed: which store, what went wrong, what to do."""
    text = f"{type(exc).__name__}: {exc}".lower()
    if uri.startswith("sqlite:"):
        store = uri.removeprefix("sqlite:///")
        if "not a database" in text or "malformed" in text or "no such table" in text:
            why, fix = "is not a readable MLflow database (corrupt or foreign)", f"move {store} aside (a new one is made)"
        elif "locked" in text:
            why, fix = f"stayed locked by another process for {LOCK_WAIT_S:.0f} s", "retry when the other writer is done"
        elif isinstance(exc, OSError) and exc.filename:  # the artifact folder, not the database
            return (f"MLflow store {store}: its artifacts folder {_os_reason(exc, text)}; make it writable "
                    "(or free its disk), or point MLFLOW_TRACKING_URI elsewhere")
        else:
            why, fix = _os_reason(exc, text), "fix the store's files or point MLFLOW_TRACKING_URI elsewhere"
        return f"MLflow store {store} {why}; {fix}"
    if uri.startswith(("http://", "https://")):
        return (f"MLflow server {uri} stopped answering ({type(exc).__name__}); start it again, or unset "
                "MLFLOW_TRACKING_URI to use the project's own store")
    return f"MLflow store {uri} failed ({_os_reason(exc, text)}); check it or point MLFLOW_TRACKING_URI elsewhere"


def _os_reason(exc: BaseException, text: str) -> str:
    """The operating system's reason in a few words (a read-only folder, a full disk, ...)."""
    where = f" at {exc.filename}" if isinstance(exc, OSError) and exc.filename else ""
    for needle, reason in (("read-only", "is on a read-only file system"), ("readonly", "is read-only"),
                           ("permission denied", "cannot be written"), ("not permitted", "cannot be written"),
                           ("no space left", "is on a full disk")):
        if needle in text:
            return f"{reason}{where}"
    first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
    return f"failed ({type(exc).__name__}{': ' + first if first else ''})"


LOCK_WAIT_S = 60.0  # how long a call waits out another process's write lock on the SQLite store


def _retry_locked(fn: Callable[[], Any], wait_s: float = LOCK_WAIT_S) -> Any:
    """`fn()`, retried with backoff while SQLite says "database is locked" (several writers at once)."""
    deadline, delay = time.monotonic() + wait_s, 0.05
    while True:
        try:
            return fn()
        except Exception as exc:
            if "database is locked" not in str(exc).lower() or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


class StageRun:
    """The MLflow run of one executed stage (or a no-op stand-in when tracking is off).

    Everything a stage records goes through `_log` as an operation ("op"): applied to the
    live run when the store works, and always kept in a journal. When the store fails (at
    the start or mid-run) the run goes offline: nothing more is sent, the stage carries on,
    and at its end the journal is saved under .mlflow-pending/ with copies of the files it
    names, for `catch_up` to record later. A failure never touches the stage's outputs.
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

    def log_epoch(self, row: dict[str, float]) -> None:
        self._log({"op": "metrics", "values": {k: float(v) for k, v in row.items() if k != "epoch"},
                   "step": int(row["epoch"])})

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

    def log_model(self, model, example, checkpoint: str | Path) -> None:
        """Log a torch model as an MLflow model (signature, input example, explicit requirements)
        and tag the run with its URI; a catch-up rebuilds it from `checkpoint`."""
        op = {"op": "model", "checkpoint": str(Path(checkpoint).resolve()), "example": example.tolist()}
        self._log(op, live=lambda: _model_or_warn(op, model, self.stage))


    def log_training(self, result: dict, checkpoint: str | Path, mlflow_model: bool = False) -> None:
        """Final metrics of a training step's result, and its checkpoint file as an artifact.

        With `mlflow_model` (the student, which the registry serves) the model is also
        logged as an MLflow model (torch.export, about 3 s); the teacher and the baseline
        are compared by their metrics and keep only the checkpoint.
        """
        self.log_metrics({k: result[k] for k in ("best_val_accuracy", "best_epoch", "parameters")})
        self.log_artifact(checkpoint, "checkpoint")
        if mlflow_model:
            self.log_model(result["model"], result["example"], checkpoint)

    def log_step(self, row: dict[str, float]) -> None:
        """A language model's val row, at its optimizer step."""
        self._log({"op": "metrics", "values": {k: float(v) for k, v in row.items() if k != "step"},
                   "step": int(row["step"])})

    def log_lm_training(self, result: dict, checkpoint: str | Path, model=None, example=None) -> None:
        """A language model's final metrics and checkpoint artifact; with `model` and `example` (the
        student, which the registry serves: ids -> next-token logits) also an MLflow model."""
        self.log_metrics({k: result[k] for k in ("best_step", "best_val_bits_per_token", "parameters",
                                                 "train_seconds")})
        self.log_artifact(checkpoint, "checkpoint")
        if model is not None:
            self.log_model(model, example, checkpoint)

    def log_dataset(self, path: Path, name: str, digest: str, context: str) -> None:
        """Record a file as a dataset input of this run (source path and digest, not the data)."""
        self._log({"op": "dataset", "path": str(Path(path).resolve()), "name": name, "digest": digest[:16],
                   "context": context})


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


def apply(op: dict, model=None, load_model: Callable[[str], Any] | None = None) -> Any:
    """Record one journal operation on the active MLflow run (live, or when catching up).
    A "model" op logs `model`, or the one `load_model` rebuilds from the op's checkpoint."""
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
        mlflow.set_tag(TAG_MODEL_URI, _log_torch_model(model, op["example"]))
    elif kind == "dataset":
        _log_dataset(op)
    elif kind == "child":
        _log_child(op)
    elif kind == "register":
        return _register(op)
    else:
        raise ValueError(f"unknown tracking operation {kind!r}")
    return None


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


def _log_dataset(op: dict) -> None:
    import warnings

    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # "can be interpreted in multiple ways": all are local files
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(Path(op["path"]).as_uri())
    mlflow.log_input(MetaDataset(source, name=op["name"], digest=op["digest"]), context=op["context"])


@contextmanager
def stage_run(stage: str, cfg: TrackingConfig, params: dict, receipt: str | Path | None) -> Iterator[StageRun]:
    """Open the MLflow run of an executed stage, nested under its pipeline's parent run.

    Logs `params` flattened and the lineage tags; on success writes `receipt` (run ids)
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
            "dvc.inputs_sha256": stage_inputs_sha256(stage, params)}
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
    finally:
        _finish(run, status)
    waiting = None
    if run.failure:
        try:
            waiting = _save_journal(root, run, cfg.experiment, tags)
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
        parent_id = _retry_locked(lambda: _parent_run(experiment_id, pipeline_id))
        active = _retry_locked(lambda: mlflow.start_run(experiment_id=experiment_id, run_name=stage,
                                                         parent_run_id=parent_id, nested=True, tags=tags))
    return experiment_id, active.info.run_id


def _end_run(status: str) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.end_run(status)


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """A file lock beside an SQLite store (no-op for a server, which serialises its own writes)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock

    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock", timeout=LOCK_WAIT_S):
        yield


PENDING_DIR = ".mlflow-pending"  # under the project root: stage records that tracking missed
# The ops that record a file the stage wrote (copied into the journal), and the key naming it;
# a dataset op names its source path but records no data.
FILE_KEYS = {"artifact": "path", "model": "checkpoint"}


def _save_journal(root: Path, run: StageRun, experiment: str, tags: dict) -> str:
    """Write the run's journal, with copies of the files it names, to a new folder under
    .mlflow-pending/; return the folder (relative to the project)."""
    import shutil

    folder = root / PENDING_DIR / f"{time.strftime('%Y%m%dT%H%M%S')}-{run.stage}-{os.getpid()}"
    files = folder / "files"
    files.mkdir(parents=True, exist_ok=True)
    ops = []
    for i, op in enumerate(run.journal):
        op, key = dict(op), FILE_KEYS.get(op["op"])
        if key and Path(op[key]).exists():
            copy = files / f"{i:03d}" / Path(op[key]).name  # the name it is logged under
            copy.parent.mkdir()
            (shutil.copytree if Path(op[key]).is_dir() else shutil.copy2)(op[key], copy)
            op[key] = str(copy.relative_to(folder))
        ops.append(op)
    write_json(folder / "journal.json", {"stage": run.stage, "experiment": experiment, "tags": tags,
                                         "pipeline_run": run.pipeline_id, "live_run_id": run.run_id,
                                         "error": run.failure, "ops": ops})
    return str(folder.relative_to(root))


def pending(root: Path) -> list[Path]:
    """The saved journals waiting to be recorded, oldest first."""
    return sorted(p.parent for p in (root / PENDING_DIR).glob("*/journal.json"))


def catch_up(root: Path, load_model: Callable[[str], Any], on_each: Callable[[str], None] = log.info) -> list[str]:
    """Record every saved journal under `root`/.mlflow-pending/ as a complete run in the store
    configured now (oldest first), then remove it; `load_model` rebuilds a logged model from
    its checkpoint (distill.models, passed in: this plumbing module imports no model code). A run half-recorded before the failure
    is marked FAILED and tagged with its replacement. Returns the new run ids; raises a
    UserError naming the store when it still cannot be used (what is left stays pending)."""
    import shutil

    uri = tracking_uri(root)
    done = []
    for folder in pending(root):
        journal = json.loads((folder / "journal.json").read_text())
        try:
            run_id = _replay(folder, journal, root, uri, load_model)
        except Exception as exc:
            try:
                _end_run("FAILED")
            except Exception:
                pass
            why = str(exc) if isinstance(exc, (TrackingFailure, UserError)) else describe_failure(exc, uri)
            raise UserError(f"{why}; {len(pending(root))} run(s) still wait in {PENDING_DIR}/") from None
        shutil.rmtree(folder)
        done.append(run_id)
        on_each(f"recorded {journal['stage']} (pipeline {journal['pipeline_run']}) as run {run_id}")
    return done


def _replay(folder: Path, journal: dict, root: Path, uri: str, load_model: Callable[[str], Any]) -> str:
    import mlflow

    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    with _store_lock(uri):
        experiment_id = _retry_locked(lambda: _experiment_id(journal["experiment"], root, uri))
        parent_id = _parent_run(experiment_id, journal["pipeline_run"])
        tags = journal["tags"] | {"distill.caught_up": "true"}
        active = mlflow.start_run(experiment_id=experiment_id, run_name=journal["stage"], parent_run_id=parent_id,
                                  nested=True, tags=tags)
    ids = _id_map(root)
    for op in journal["ops"]:
        op = _replayable(op, folder, ids)
        try:
            _retry_locked(lambda: apply(op, load_model=load_model))
        except Exception as exc:
            if op["op"] not in ("model", "register"):
                raise
            # the rest of the record matters more than a model logged or registered late
            log.warning("%s: %s not recorded (%s: %s)", journal["stage"], op["op"], type(exc).__name__,
                        str(exc).splitlines()[0][:160] if str(exc) else "")
    mlflow.end_run("FINISHED")
    old, new = journal.get("live_run_id"), active.info.run_id
    if old:  # the part recorded before the failure, if the store still has it
        ids[old] = new
        write_json(root / PENDING_DIR / ID_MAP, ids)
        try:
            client = mlflow.MlflowClient()
            client.set_tag(old, "distill.superseded_by", new)
            client.set_terminated(old, "FAILED")
        except Exception:
            pass
    return new


ID_MAP = "superseded.json"  # under .mlflow-pending/: live run id -> the complete run catch-up recorded


def _id_map(root: Path) -> dict[str, str]:
    path = root / PENDING_DIR / ID_MAP
    return json.loads(path.read_text()) if path.is_file() else {}


def _replayable(op: dict, folder: Path, ids: dict[str, str]) -> dict:
    """The journal's op with its copied files' paths made absolute, and run ids that catch-up
    replaced (a half-recorded run) by the complete run's."""
    op, key = dict(op), FILE_KEYS.get(op["op"])
    if key:  # relative: copied into the journal's folder; absolute: left where it was (missing then)
        op[key] = str(folder / op[key])
    if op["op"] == "register":
        op["student_run"] = ids.get(op["student_run"], op["student_run"])
    if op["op"] == "child":
        model_run = op["tags"].get("distill.model_run_id")
        op["tags"] = op["tags"] | {"distill.model_run_id": ids.get(model_run, model_run)}
    return op


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


def _write_receipt(receipt: str | Path | None, content: dict) -> None:
    if receipt is not None:
        write_json(receipt, content)


def _experiment_id(name: str, root: Path, uri: str) -> str:
    import mlflow

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        try:
            return mlflow.create_experiment(name, artifact_location=artifact_root(root, uri), tags=EXPERIMENT_TAGS)
        except Exception:  # made meanwhile by another writer (a second checkout, a sweep point)
            experiment = mlflow.get_experiment_by_name(name)
            if experiment is None:
                raise
    _check_artifacts_here(experiment, root, uri)
    if any(experiment.tags.get(k) != v for k, v in EXPERIMENT_TAGS.items()):
        for key, value in EXPERIMENT_TAGS.items():
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def _check_artifacts_here(experiment, root: Path, uri: str) -> None:
    """The project's own store keeps artifacts in the project's mlruns/: a store copied or moved
    from another folder still names that folder, and nothing is written there."""
    own = artifact_root(root, uri)
    if own and experiment.artifact_location.rstrip("/") != own.rstrip("/"):
        raise TrackingFailure(
            f"MLflow store {uri.removeprefix('sqlite:///')} keeps experiment '{experiment.name}' artifacts in "
            f"{experiment.artifact_location}, not this project's {own} (copied or moved from there?); run "
            "`distill relocate` to make the store this project's (bring mlruns/ along to keep old artifacts)"
        )


def relocate(root: Path) -> int:
    """Point the project's SQLite store at this project's mlruns/: every experiment, run, logged
    model and model version whose artifacts were under another folder's mlruns/ (the project
    was copied or moved). Returns how many rows changed."""
    import sqlite3
    from urllib.parse import urlparse

    db, own = root / "mlflow.db", (root / "mlruns").as_uri()
    if not db.is_file():
        raise UserError(f"{db}: no MLflow store here; nothing to relocate")
    columns = {"experiments": ["artifact_location"], "runs": ["artifact_uri"], "logged_models": ["artifact_location"],
               "model_versions": ["source", "storage_location"]}
    with sqlite3.connect(db) as con:
        olds = {row[0].rstrip("/") for row in con.execute("SELECT artifact_location FROM experiments")
                if urlparse(row[0]).scheme == "file" and row[0].rstrip("/").endswith("/mlruns")}
        changed = 0
        for old in olds - {own}:
            for table, cols in columns.items():
                if not con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,)).fetchone():
                    continue
                for col in cols:
                    changed += con.execute(
                        f"UPDATE {table} SET {col} = ? || substr({col}, ?) WHERE substr({col}, 1, ?) = ?",
                        (own, len(old) + 1, len(old), old)).rowcount
    return changed


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
    for role, model_run in result.run_ids.items():
        config = dict(result.configs.get(role, {}))
        if role == "baseline":  # trained with the student's config, but no distillation key applies to it
            config = {k: v for k, v in config.items() if k not in DISTILLATION_KEYS}
        run._log({"op": "child", "name": f"evaluate {role}",
                  "tags": {TAG_STAGE: "evaluate", "distill.model_role": role, "distill.model_run_id": str(model_run),
                           TAG_PIPELINE_RUN: run.pipeline_id},
                  "params": {"role": role} | {k: str(v) for k, v in flatten(config).items()},
                  "metrics": {k: float(v) for k, v in result.metrics[role].items()}})
    if result.metrics.get("gap_closed") is not None:
        run.log_metrics({"gap_closed": result.metrics["gap_closed"]})
    for path in artifacts:
        run.log_artifact(path)


def _log_child(op: dict) -> None:
    import mlflow

    experiment_id = mlflow.active_run().info.experiment_id
    with mlflow.start_run(run_name=op["name"], nested=True, experiment_id=experiment_id, tags=op["tags"]):
        mlflow.log_params(op["params"])
        mlflow.log_metrics(op["metrics"])


def register_student(run: StageRun, student_run: str | None, registry: RegistryConfig, passed: bool) -> dict:
    """Register the student's model, tagged with the quality gate's verdict (evaluation.passes_gate);
    give the new version the alias only if it passed.

    Returns {"registered_version": ..., "gate_passed": ...}: (None, None) when this evaluate run is
    not tracked (tracking off now, whatever the checkpoint recorded), the student was not, or the
    store failed (the registration then waits in the journal with the rest of the run).
    """
    if not run.tracked or not student_run:
        return {"registered_version": None, "gate_passed": None}
    version = run._log({"op": "register", "student_run": student_run, "model_name": registry.model_name,
                        "alias": registry.alias, "passed": passed})
    return {"registered_version": version, "gate_passed": passed if version else None}


def _register(op: dict) -> str:
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    name, student_run = op["model_name"], op["student_run"]
    model_uri = client.get_run(student_run).data.tags.get(TAG_MODEL_URI, f"runs:/{student_run}/model")
    version = mlflow.register_model(model_uri, name).version
    client.set_model_version_tag(name, version, "quality_gate", "passed" if op["passed"] else "failed")
    if op["passed"]:
        client.set_registered_model_alias(name, op["alias"], version)
    return version
