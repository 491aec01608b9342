"""The command-line tools the orchestration runs (dvc, git, mlflow, torchrun), and how
to read what a failed stage said.

Tools are run by path from this interpreter's bin folder, and that folder is put first
on PATH for what they start themselves (DVC runs stage commands and queue workers
from PATH).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from distill.errors import UserError

BIN = Path(sys.executable).parent


def tool_env(**extra: str) -> dict[str, str]:
    """os.environ with BIN first on PATH, plus `extra`, for dvc / mlflow subprocesses."""
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra)


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    """`dvc args` in `root`; a failure is a UserError with DVC's last words."""
    result = subprocess.run([str(BIN / "dvc"), *args], cwd=root, capture_output=True, text=True, env=tool_env())
    if result.returncode:
        raise UserError(f"dvc {' '.join(args)} failed: {(result.stderr or result.stdout).strip()[-500:]}")
    return result


def stage_error(lines: Iterable[str]) -> str | None:
    """The one-sentence error a stage printed ("... error: <sentence>"), from a dvc command's output lines."""
    return next((line.split("error: ", 1)[1].strip() for line in lines if "error: " in line), None)
