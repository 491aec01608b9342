"""A stage run's record kept on disk when the tracking store fails.

StageRun journals every operation it records; when the store cannot be used, `stage_run`
saves that journal under .mlflow-pending/ in the project, with copies of the files it names
(the stage's outputs may change or go before the store is back), and `distill catch-up`
(distill/catchup.py) records it later as a complete run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from distill.io import write_json

PENDING_DIR = ".mlflow-pending"  # under the project root: stage records that tracking missed
# The ops that record a file the stage wrote (copied into the journal), and the key naming it;
# a dataset op names its source path but records no data.
FILE_KEYS = {"artifact": "path", "model": "checkpoint"}


def write(root: Path, run, experiment: str, tags: dict) -> str:
    """Write the journal of `run` (a tracking.StageRun), with copies of the files it names, to a
    new folder under .mlflow-pending/; return the folder (relative to the project)."""
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
