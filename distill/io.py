"""Atomic outputs and content fingerprints.

Every stage output is written to a temporary sibling and renamed into place, so a
stage that is killed leaves either its previous outputs or none, never a partial
file that DVC could cache. Fingerprints (sha256 of file bytes) record which inputs
produced an artifact, so consumers can refuse stale ones.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_CHUNK = 1 << 20


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it over `target` on success.

    Works for files and directories. On an exception the temporary is removed and
    the old `target` (if any) is left untouched; temporaries of a killed writer are
    removed by the next one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if target.is_dir():
            # A directory cannot be renamed over a non-empty one: move the old one
            # aside first, so the window without a complete target is one rename.
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            _remove(old)
        else:
            os.replace(tmp, target)
    finally:
        _remove(tmp)


def _remove_leftovers(target: Path) -> None:
    """Remove temporaries beside `target` left by a writer that was killed (its pid is gone)."""
    for kind in ("tmp", "old"):
        for path in target.parent.glob(f".{target.name}.{kind}-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not pid_alive(int(pid)):
                _remove(path)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_id(pid: int | None = None) -> tuple[int, float]:
    """A process as (pid, start time): the pid alone may be a new process's once the first has gone."""
    import psutil

    process = psutil.Process(pid)
    return process.pid, process.create_time()


def process_running(pid: int, started: float) -> bool:
    """Whether the process that process_id named is still running."""
    import psutil

    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0
    except psutil.Error:
        return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_json(path: str | Path, obj: object) -> None:
    """Write `obj` as pretty JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """Write `text`, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_csv(path: str | Path, rows: list[dict]) -> None:
    """Write dict rows as CSV (header from the first row; floats to 6 places), atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    write_text(path, buf.getvalue())


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tree_sha256(path: str | Path, skip: tuple[str, ...] = ()) -> str:
    """Hex sha256 over a file, or over every file of a directory (names and bytes), less the
    top-level entries named in `skip`."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.relative_to(path).parts[0] not in skip):
        digest.update(f.relative_to(path).as_posix().encode())
        digest.update(file_sha256(f).encode())
    return digest.hexdigest()


def read_checkpoint(path: str | Path) -> object:
    """A torch.save file, weights only (no pickled code runs), or one sentence why not."""
    import torch

    from distill.errors import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found; run the stage that makes it (dvc repro)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a truncated or foreign file
        raise UserError(f"{path}: not a readable checkpoint ({type(exc).__name__}); rerun its stage") from None


def git_head(root: str | Path) -> str | None:
    """The git commit checked out at `root`, or None outside a repository."""
    import subprocess

    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None
