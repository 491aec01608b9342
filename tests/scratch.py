"""Scratch copies of the project, for end-to-end tests and benchmarks.

A scratch copy holds the project's files (tracked, plus untracked files git does
not ignore) in a fresh git repository, with DVC's configuration, and none of the
source checkout's outputs, lock file or caches.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from pipelines.tools import tool_env

PROJECT_DIR = Path(__file__).resolve().parents[1]
GIT_IDENTITY = ["-c", "user.name=distill", "-c", "user.email=distill@localhost"]


def project_files(root: Path = PROJECT_DIR) -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=root, check=True, capture_output=True, text=True).stdout
    return [f for f in out.splitlines() if (root / f).is_file()]


def env() -> dict[str, str]:
    """The environment for dvc and stage subprocesses (pipelines.tools.tool_env), without DISTILL_DEBUG:
    tests read the stages' one-line errors."""
    out = tool_env()
    out.pop("DISTILL_DEBUG", None)
    return out


def git_commit(repo: Path, message: str) -> None:
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env=env())
    subprocess.run(["git", *GIT_IDENTITY, "commit", "-qm", message], cwd=repo, check=True, env=env())


def make_scratch_project(dest: Path, params_yaml: str | None = None) -> Path:
    """Copy the project to `dest` as a fresh, committed git + DVC repository."""
    for rel in project_files():
        if rel in ("dvc.lock", "reports/metrics.json"):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT_DIR / rel, target)
    if params_yaml is not None:
        (dest / "params.yaml").write_text(params_yaml)
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=dest, check=True, env=env())
    git_commit(dest, "scratch copy")
    return dest
