"""Where MLflow runs are recorded, and what to say when that store cannot be used.

The store is MLFLOW_TRACKING_URI when set (a server), else a SQLite store and an artifact
root inside the project (mlflow.db, mlruns/; git-ignored), as absolute paths, so the
private clones a sweep runs its points in (under .dvc/tmp/exps/) log to the same store.
Several writers share the SQLite store (sweep points, two checkouts): a file lock beside it
serialises starting runs, and calls retry while SQLite says it is locked. A store copied
or moved from another folder is made this project's by `relocate`.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from distill import interrupts
from distill.errors import UserError

# The MLflow UI opens an experiment of this kind on its runs (training), not on the GenAI overview.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
# Fail fast against an unreachable server instead of retrying for minutes (set when a run starts).
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
LOCK_WAIT_S = 60.0  # how long a call waits out another process's write lock on the SQLite store


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


def _retry_locked(fn: Callable[[], Any], wait_s: float = LOCK_WAIT_S) -> Any:
    """`fn()`, retried with backoff while SQLite says "database is locked" (several writers at once).
    A stop (Ctrl-C, SIGTERM) waits for the call under way (distill/interrupts.py)."""
    deadline, delay = time.monotonic() + wait_s, 0.05
    while True:
        try:
            with interrupts.deferred():
                return fn()
        except Exception as exc:
            if "database is locked" not in str(exc).lower() or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


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
