"""DVC experiments: a grid of params.yaml overrides, each point run and read back.

A sweep is a set of ordinary DVC experiments, so `dvc exp show`, `dvc exp apply` and
`dvc exp push` work on it as on any other; DVC's run cache means a point that changes
only student keys reruns only the student and evaluate stages. Each point is one
`dvc exp run` in a private clone of the project (run_in_clone), pushed back as an
experiment of the project; pipelines/sweep.py runs the points, locally or on Dask.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from distill.config import load_params
from distill.errors import UserError
from distill.io import git_head
from distill.task import ROLES as MODELS
from distill.task import Headline, task_class
from pipelines.dvcfile import evaluate_file
from pipelines.tools import BIN, stage_error, tool_env


def grid(axes: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination of the axes' values, the first axis slowest."""
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


def point_name(prefix: str, overrides: dict[str, str]) -> str:
    """A readable experiment name, valid as a git ref: sweep-temperature2-alpha0.5."""
    parts = [f"{k.rsplit('.', 1)[-1]}{v}" for k, v in overrides.items()]
    return re.sub(r"[^A-Za-z0-9._-]", "_", "-".join([prefix, *parts]))


def metrics(root: Path, rev: str) -> dict:
    """The metrics file of the experiment commit `rev`: evaluate's --metrics in `root`'s dvc.yaml
    (relative to `root`, which may be a DVC project inside the git repository, as lm/ and text/ are)."""
    path = evaluate_file(root, "metrics").as_posix()
    shown = subprocess.run(["git", "show", f"{rev}:./{path}"], cwd=root, capture_output=True, text=True, check=False)
    if shown.returncode or not rev:
        raise UserError(f"experiment commit {rev or '(none)'} has no {path} in this repository; see the sweep's log")
    return json.loads(shown.stdout)


def repo_top(root: Path) -> Path | None:
    """The top folder of the git repository holding `root` (None outside one)."""
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True, check=False)
    return Path(top.stdout.strip()).resolve() if top.returncode == 0 else None


def default_prefix(root: Path) -> str:
    """`sweep`, or `sweep-lm` for the DVC project in lm/: DVC names experiments per repository
    (refs/exps/<commit>/<name>), so points of two projects in one repository must differ by name."""
    top = repo_top(root)
    return f"sweep-{root.resolve().name}" if top not in (None, root.resolve()) else "sweep"


def project_task(root: Path) -> type:
    """The class of the task `root`/params.yaml names (distill/task.py): it says what the
    commands show of its metrics and params (its `headline`, `exp_metrics`, `exp_params`)."""
    return task_class(load_params(root / "params.yaml", task=None).task, root)


def summary(rows: list[tuple[str, dict[str, str], dict]], headline: Headline) -> str:
    """Markdown: one row per experiment, its overrides, the three models' headline test metric
    (the task's: accuracy, bits per token, ...) and the gap closed."""
    keys = list(rows[0][1]) if rows else []
    head = ["experiment", *keys, *(f"{model} {headline.label}" for model in MODELS), "gap closed"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, overrides, m in rows:
        gap = m.get("gap_closed")
        cells = [name, *(overrides[k] for k in keys), *(headline.show(m[model][headline.key]) for model in MODELS),
                 "n/a" if gap is None else f"{100 * gap:.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def one_line(name: str, m: dict, headline: Headline) -> str:
    """A finished point in one line: the three models' headline test metric and the gap closed."""
    gap = m.get("gap_closed")
    return (f"{name}: " + ", ".join(f"{model} {headline.show(m[model][headline.key])}{headline.unit}"
                                    for model in MODELS)
            + (", no gap to close" if gap is None else f", gap closed {100 * gap:.1f}%"))


def exp_columns(task: type, metrics_file: Path) -> str:
    """The columns `distill compare --exps` keeps, as `dvc exp show --keep` takes them (a regex; with
    every column the table collapses to "…" on most terminals): each model's headline and other
    metrics the task names, the gap closed, and the task's params keys. With another pipeline's files in the repository too (text/, lm/), DVC names each column
    by its file (params.yaml:seed, reports/metrics.json:gap_closed), so those prefixes are allowed."""
    def either(names) -> str:
        return "|".join(re.escape(name) for name in names)

    metrics = either((task.headline.key, *task.exp_metrics))
    return (rf"^(Experiment|Created|({re.escape(metrics_file.as_posix())}:)?(({either(MODELS)})\.({metrics})"
            rf"|gap_closed)|(params\.yaml:)?({either(task.exp_params)}))$")


def workspace_state(root: Path) -> tuple[str, bytes]:
    """The commit checked out at `root` and the uncommitted changes to tracked files, as a binary patch:
    what `dvc exp run --queue` would take from the workspace (untracked files are left out, as there)."""
    head = git_head(root)
    if head is None:
        raise UserError(f"{root}: not a git repository with a commit; a sweep runs DVC experiments, which need one")
    # paths from the repository's top whatever the user's diff settings, as run_in_clone applies them
    patch = subprocess.run(["git", "diff", "--binary", "--no-relative", "--src-prefix=a/", "--dst-prefix=b/", "HEAD"],
                           cwd=root, capture_output=True, check=True)
    return head, patch.stdout


def remove(root: Path, name: str) -> None:
    """Remove the experiment `name` if there is one (a sweep replaces its earlier points)."""
    subprocess.run([str(BIN / "dvc"), "exp", "remove", name], cwd=root, capture_output=True, env=tool_env())


CLONES = Path(".dvc") / "tmp" / "exps" / "clones"


def run_in_clone(root: Path, name: str, overrides: dict[str, str], baseline: str, patch: bytes = b"",
                 log: Callable[[str], None] = lambda line: None, extra_env: dict[str, str] | None = None) -> str:
    """Run one experiment in a private clone of the project, push it back as `name`; return its commit.
    `root` is the DVC project: the git repository's top, or a folder in it (lm/, text/), which is
    where the experiment runs in the clone.

    Several `dvc exp run --temp` in one repository collide on DVC's repository lock (and
    share one stash), so each point gets what DVC's own temporary executor builds, but to
    itself: a git clone at `baseline` with the workspace `patch` applied, under the
    project's .dvc/tmp/exps/ (MLflow runs find the project's store from there, see
    store.project_root), using the project's DVC cache (outputs and run cache shared,
    so unchanged stages are checked out, not rerun). There a plain `dvc exp run --name`
    runs, and `dvc exp push` sends the experiment's ref to the project, where `dvc exp show`
    lists it. The clone is deleted afterwards.
    """
    base = root / CLONES
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=base))
    run_env = tool_env(**(extra_env or {}))

    def step(*cmd: str, stdin: bytes | None = None, cwd: Path = work) -> str:
        result = subprocess.run(cmd, cwd=cwd, input=stdin, capture_output=True, env=run_env)
        if result.returncode:
            raise UserError(f"{name}: {' '.join(cmd[:3])} failed: "
                            f"{(result.stderr or result.stdout).decode(errors='replace').strip()[-500:]}")
        return result.stdout.decode(errors="replace")

    try:
        top = repo_top(root) or root.resolve()  # not a repository: the clone below says so
        here = work / root.resolve().relative_to(top)  # the project in the clone
        step("git", "clone", "--quiet", "--no-checkout", str(top), str(work), cwd=base)
        step("git", "checkout", "--quiet", "--detach", baseline)
        if patch:  # paths from the repository's top, as `git diff` writes them
            step("git", "apply", "--index", "--whitespace=nowarn", "-", stdin=patch)
        local = root / ".dvc" / "config.local"
        if local.is_file():  # remotes and the like; the cache is set next
            shutil.copy(local, here / ".dvc" / "config.local")
        step(str(BIN / "dvc"), "config", "--local", "cache.dir",
             step(str(BIN / "dvc"), "cache", "dir", cwd=root).strip(), cwd=here)
        cmd = [str(BIN / "dvc"), "exp", "run", "--name", name,
               *itertools.chain.from_iterable(("-S", f"{k}={v}") for k, v in overrides.items())]
        proc = subprocess.Popen(cmd, cwd=here, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        lines = []
        for line in proc.stdout:
            log(line.rstrip())
            lines.append(line.strip())
        if proc.wait():
            # a stage's own one-sentence error says most, then DVC's last non-empty line
            reason = stage_error(lines) or next((ln for ln in reversed(lines) if ln), "no output")
            raise UserError(f"{name}: dvc exp run failed: {reason}")
        step(str(BIN / "dvc"), "exp", "push", "--no-cache", "--force", "origin", name, cwd=here)
        return exp_rev(work, name)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def exp_rev(repo: Path, name: str) -> str:
    """The commit of the experiment `name` in `repo` ("" if there is none)."""
    refs = subprocess.run(["git", "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps/"], cwd=repo,
                          capture_output=True, text=True, check=True).stdout.split("\n")
    return next((line.split()[0] for line in refs if line.endswith(f"/{name}")), "")
