"""DVC experiments: a grid of params.yaml overrides, queued, run, and read back.

A sweep is a set of ordinary DVC experiments (`dvc exp run --queue -S key=value`),
so `dvc exp show`, `dvc exp apply` and `dvc exp push` work on it as on any other;
DVC's run cache means a point that changes only student keys reruns only the
student and evaluate stages. Fanned out on Dask (pipelines/sweep.py), each point is one
`dvc exp run` in a private clone of the project (run_in_clone), pushed back as an
experiment of the project.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from distill.cli import BIN, tool_env
from distill.config import load_params
from distill.errors import UserError

env = tool_env  # DVC starts its queue workers and stage commands from PATH


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


def workspace_state(root: Path) -> tuple[str, bytes]:
    """The commit checked out at `root` and the uncommitted changes to tracked files, as a binary patch:
    what `dvc exp run --queue` would take from the workspace (untracked files are left out, as there)."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
    patch = subprocess.run(["git", "diff", "--binary", "HEAD"], cwd=root, capture_output=True, check=True)
    return head.stdout.strip(), patch.stdout


def remove(root: Path, name: str) -> None:
    """Remove the experiment `name` if there is one (a sweep replaces its earlier points)."""
    subprocess.run([str(BIN / "dvc"), "exp", "remove", name], cwd=root, capture_output=True, env=env())


CLONES = Path(".dvc") / "tmp" / "exps" / "clones"


def run_in_clone(root: Path, name: str, overrides: dict[str, str], baseline: str, patch: bytes = b"",
                 log=lambda line: None, extra_env: dict[str, str] | None = None) -> str:
    """Run one experiment in a private clone of the project, push it back as `name`; return its commit.

    Several `dvc exp run --temp` in one repository collide on DVC's repository lock (and
    share one stash), so each point gets what DVC's own temporary executor builds, but to
    itself: a git clone at `baseline` with the workspace `patch` applied, under the
    project's .dvc/tmp/exps/ (MLflow runs find the project's store from there, see
    tracking.project_root), using the project's DVC cache (outputs and run cache shared,
    so unchanged stages are checked out, not rerun). There a plain `dvc exp run --name`
    runs, and `dvc exp push` sends the experiment's ref to the project, where `dvc exp show`
    lists it. The clone is deleted afterwards.
    """
    base = root / CLONES
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=base))
    run_env = env() | (extra_env or {})

    def step(*cmd: str, stdin: bytes | None = None, cwd: Path = work) -> str:
        result = subprocess.run(cmd, cwd=cwd, input=stdin, capture_output=True, env=run_env)
        if result.returncode:
            raise UserError(f"{name}: {' '.join(cmd[:3])} failed: "
                            f"{(result.stderr or result.stdout).decode(errors='replace').strip()[-500:]}")
        return result.stdout.decode(errors="replace")

    try:
        step("git", "clone", "--quiet", "--no-checkout", str(root), str(work), cwd=base)
        step("git", "checkout", "--quiet", "--detach", baseline)
        if patch:
            step("git", "apply", "--index", "--whitespace=nowarn", "-", stdin=patch)
        local = root / ".dvc" / "config.local"
        if local.is_file():  # remotes and the like; the cache is set next
            shutil.copy(local, work / ".dvc" / "config.local")
        step(str(BIN / "dvc"), "config", "--local", "cache.dir",
             step(str(BIN / "dvc"), "cache", "dir", cwd=root).strip())
        cmd = [str(BIN / "dvc"), "exp", "run", "--name", name,
               *itertools.chain.from_iterable(("-S", f"{k}={v}") for k, v in overrides.items())]
        proc = subprocess.Popen(cmd, cwd=work, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        errors, last = [], ""
        for line in proc.stdout:
            log(line.rstrip())
            last = line.strip() or last
            if "error: " in line.lower():
                errors.append(line.strip())
        if proc.wait():
            # a stage's own one-sentence error ("... distill error: ...") says most, then DVC's
            stage_errors = [e.split("error: ", 1)[1] for e in errors if "error: " in e]
            raise UserError(f"{name}: dvc exp run failed: {(stage_errors or errors or [last])[0]}")
        step(str(BIN / "dvc"), "exp", "push", "--no-cache", "--force", "origin", name)
        return _exp_rev(work, name)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _exp_rev(repo: Path, name: str) -> str:
    refs = subprocess.run(["git", "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps/"], cwd=repo,
                          capture_output=True, text=True, check=True).stdout.split("\n")
    return next((line.split()[0] for line in refs if line.endswith(f"/{name}")), "")
