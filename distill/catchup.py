"""Catching up: recording in MLflow the stage runs a failed store left waiting.

When the store fails, a stage carries on and its journal is saved under .mlflow-pending/
(distill/journal.py). `catch_up` (`distill catch-up`) records each saved journal as a
complete run in the store configured now, oldest first, nested under its pipeline's parent
run as the live run would have been, and links a run half-recorded before the failure to
the complete one that replaces it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distill.errors import UserError
from distill.io import write_json
from distill.journal import FILE_KEYS, PENDING_DIR
from distill.model_registry import _register
from distill.run_logging import TAG_PROCESS, _end_run, _parent_run, apply, this_process
from distill.store import (TrackingFailure, _experiment_id, _retry_locked, _store_lock, check_reachable,
                           describe_failure, tracking_uri)

log = logging.getLogger(__name__)


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
        # the process catching up runs it now: a stage starting meanwhile must not take it for a dead one's
        tags = journal["tags"] | {"distill.caught_up": "true", TAG_PROCESS: this_process()}
        active = mlflow.start_run(experiment_id=experiment_id, run_name=journal["stage"], parent_run_id=parent_id,
                                  nested=True, tags=tags)
    ids = _id_map(root)
    for op in journal["ops"]:
        op = _replayable(op, folder, ids)
        try:
            _retry_locked(lambda: _record(op, load_model))
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


def _record(op: dict, load_model: Callable[[str], Any]) -> Any:
    """One journal operation on the active run; a registration is the model registry's to record."""
    return _register(op) if op["op"] == "register" else apply(op, load_model=load_model)
