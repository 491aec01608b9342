"""DVC experiments: a grid of params.yaml overrides, queued, run, and read back.

A sweep is a set of ordinary DVC experiments (`dvc exp run --queue -S key=value`),
so `dvc exp show`, `dvc exp apply` and `dvc exp push` work on it as on any other;
DVC's run cache means a point that changes only student keys reruns only the
student and evaluate stages.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from distill.config import load_params
from distill.errors import UserError

BIN = Path(sys.executable).parent


def env() -> dict[str, str]:
    """This interpreter's bin first on PATH: DVC starts its queue workers and stage commands from PATH."""
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def parse_axes(pairs: list[str]) -> dict[str, list[str]]:
    """["student.temperature=1,2,4", "student.alpha=0.5,0.9"] -> {key: [values]}."""
    axes: dict[str, list[str]] = {}
    for pair in pairs:
        key, sep, values = pair.partition("=")
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not items:
            raise UserError(f"--set {pair!r}: expected key=value[,value...], e.g. student.temperature=1,2,4")
        axes[key.strip()] = items
    if not axes:
        raise UserError("a sweep needs at least one --set key=v1,v2")
    return axes


def grid(axes: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination of the axes' values, the first axis slowest."""
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


def check_point(root: Path, overrides: dict[str, str]) -> None:
    """Apply `overrides` to a copy of params.yaml as DVC would and validate it (params.yaml untouched)."""
    from dvc.utils.hydra import apply_overrides

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "params.yaml"
        shutil.copy(root / "params.yaml", copy)
        try:
            apply_overrides(copy, [f"{k}={v}" for k, v in overrides.items()])
        except Exception as exc:  # dvc wraps Hydra's errors (an unknown key, say)
            raise UserError(f"params.yaml: cannot apply {overrides}: {exc}") from None
        try:
            load_params(copy)
        except UserError as exc:
            raise UserError(f"{overrides}: {str(exc).removeprefix(str(copy) + ': ')}") from None


def point_name(prefix: str, overrides: dict[str, str]) -> str:
    """A readable experiment name, valid as a git ref: sweep-temperature2-alpha0.5."""
    parts = [f"{k.rsplit('.', 1)[-1]}{v}" for k, v in overrides.items()]
    return re.sub(r"[^A-Za-z0-9._-]", "_", "-".join([prefix, *parts]))


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "dvc"), *args], cwd=root, capture_output=True, text=True, env=env())
    if result.returncode:
        raise UserError(f"dvc {' '.join(args)} failed: {(result.stderr or result.stdout).strip()[-500:]}")
    return result


def queue(root: Path, name: str, overrides: dict[str, str]) -> None:
    """Queue one experiment (replacing an earlier one of the same name)."""
    subprocess.run([str(BIN / "dvc"), "exp", "remove", name], cwd=root, capture_output=True, env=env())
    dvc(root, "exp", "run", "--queue", "--name", name, *itertools.chain.from_iterable(
        ("-S", f"{k}={v}") for k, v in overrides.items()))


def run_queued(root: Path, jobs: int = 1) -> None:
    """Run every queued experiment, `jobs` at a time, wait for them, then stop the queue's workers.

    The output goes to a file, not a pipe: DVC's queue workers outlive the command and
    would hold a pipe open.
    """
    with tempfile.TemporaryFile("w+") as log:
        code = subprocess.call([str(BIN / "dvc"), "exp", "run", "--run-all", "--jobs", str(jobs)], cwd=root,
                               stdout=log, stderr=subprocess.STDOUT, env=env())
        subprocess.call([str(BIN / "dvc"), "queue", "stop"], cwd=root, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL, env=env())
        if code:
            log.seek(0)
            raise UserError(f"dvc exp run --run-all failed: {log.read().strip()[-500:]}")


def metrics(root: Path, name: str, path: str = "reports/metrics.json") -> dict:
    """The metrics file of a finished experiment, read from its git ref."""
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps/"], cwd=root,
                          capture_output=True, text=True, check=True).stdout.split()
    matches = [r for r in refs if r.endswith(f"/{name}")]
    if not matches:
        raise UserError(f"experiment {name} has no result; see `dvc queue logs {name}`")
    shown = subprocess.run(["git", "show", f"{matches[-1]}:{path}"], cwd=root, capture_output=True, text=True,
                           check=True).stdout
    return json.loads(shown)


def summary(rows: list[tuple[str, dict[str, str], dict]]) -> str:
    """Markdown: one row per experiment, its overrides, and the three models' test accuracy."""
    keys = list(rows[0][1]) if rows else []
    head = ["experiment", *keys, "student acc", "baseline acc", "teacher acc", "gap closed"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, overrides, m in rows:
        gap = m.get("gap_closed")
        cells = [name, *(overrides[k] for k in keys),
                 *(f"{100 * m[model]['test_accuracy']:.2f}" for model in ("student", "baseline", "teacher")),
                 "n/a" if gap is None else f"{100 * gap:.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
