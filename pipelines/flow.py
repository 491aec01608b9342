"""The pipeline flow: the DVC DAG run stage by stage as Prefect tasks.

DVC decides what must run; this flow only orders and observes it. Each DVC stage
is one task, in dependency order. A stage that DVC reports up to date is not run
and finishes in a `Reused` state; a stage that runs is `dvc repro --single-item`,
its output streamed into the task's log, so dvc.lock ends exactly as `dvc repro`
would leave it. Every run ends with a markdown artifact of the comparison
(`distill-comparison`), shown on the flow run's page.

A project busy with another pipeline run, or with a `dvc` command holding DVC's
lock, is refused at once by default; with `wait_for_lock_s` (the nightly deployment
waits an hour) the flow waits that long, then ends `Skipped` (a cancelled state,
not a crash) if the project is still busy.

    python -m pipelines.flow                                   # like dvc repro
    python -m pipelines.flow --set student.temperature=2       # like dvc exp run -S
    python -m pipelines.flow --force                           # like dvc repro -f
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pipelines  # noqa: F401  (project-local Prefect settings, before Prefect is imported)
import prefect.runtime
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.states import Cancelled, Completed

from distill.config import load_params
from distill.errors import EXIT_USER_ERROR, UserError
from distill.progress import enabled as progress_shown
from pipelines import overrides as params_overrides
from pipelines.dvcfile import evaluate_file
from pipelines.tools import BIN, run_streaming, stage_error, tool_env


POLL_S = 2.0  # how often a waiting run looks at a busy lock again
COMPARISON_ARTIFACT = "distill-comparison"


class StageFailed(RuntimeError):
    """A stage command failed for a reason that may pass on retry (killed, lock held)."""


class ProjectBusy(UserError):
    """Another pipeline run, or a dvc command, holds the project's lock."""


def dvc_plan(repo_dir: Path, deadline: float = 0.0) -> tuple[list[str], set[str]]:
    """The stage names of `repo_dir`'s dvc.yaml (the project's, or a pipeline folder's such as
    text/) in dependency order (ties kept in dvc.yaml order), and the names of those `dvc status`
    reports as changed, from one in-process look at the repo; while a dvc command holds DVC's
    lock, looked at again until `deadline` (time.monotonic)."""
    pipeline_file = (Path(repo_dir) / "dvc.yaml").resolve()
    return _waiting_for_dvc(repo_dir, deadline, lambda repo: _plan(repo, pipeline_file))


def _plan(repo, pipeline_file: Path) -> tuple[list[str], set[str]]:
    import networkx as nx

    # only this dvc.yaml's stages: the repository may hold other pipelines (text/dvc.yaml)
    stages = [stage for stage in repo.index.stages if Path(stage.dvcfile.path).resolve() == pipeline_file]
    _check_inputs_exist(stages)
    position = {stage: i for i, stage in enumerate(stages)}
    # DVC's edges point from a stage to the stages it depends on: reverse them.
    graph = repo.index.graph.subgraph(stages).reverse()
    order = nx.lexicographical_topological_sort(graph, key=position.__getitem__)
    changed = repo.status(targets=[str(pipeline_file)])
    return [stage.name for stage in order], {name.rsplit(":", 1)[-1] for name in changed}


def _dvc_lock_free(repo) -> None:
    """Take DVC's lock and give it back: raises LockError while a dvc command holds it."""
    with repo.lock:
        pass


def _waiting_for_dvc(repo_dir: Path, deadline: float, look: Callable):
    """`look(repo)` on the open DVC repository; while a dvc command holds DVC's lock, again every
    POLL_S seconds until `deadline`, then ProjectBusy."""
    from dvc.lock import LockError
    from dvc.repo import Repo

    def attempt():
        with Repo(str(repo_dir)) as repo:
            return look(repo)

    try:
        return _until(deadline, attempt, LockError)
    except LockError:
        raise ProjectBusy(f"{repo_dir}: a dvc command holds DVC's lock (.dvc/tmp/lock); "
                          "run again when it has finished") from None


def _until(deadline: float, attempt: Callable, busy: type[Exception]):
    """`attempt()` until it stops raising `busy`, every POLL_S seconds; past `deadline` (time.monotonic)
    the last `busy` is raised."""
    while True:
        try:
            return attempt()
        except busy:
            if time.monotonic() >= deadline:
                raise
            time.sleep(POLL_S)


def _check_inputs_exist(stages: list) -> None:
    """Refuse, in one sentence, a dependency that no stage makes and that is not there (the
    user's data file, say), before DVC fails on it inside a stage."""
    outs = [out.fs_path for stage in stages for out in stage.outs]
    for stage in stages:
        for dep in stage.deps:
            made = any(dep.fs_path == out or dep.fs_path.startswith(out + os.sep) for out in outs)
            if not made and not os.path.exists(dep.fs_path):
                raise UserError(f"{dep.def_path}: not found, and stage {stage.name} reads it; fix its path in "
                                "params.yaml (data.path for your data) or create it")


@contextmanager
def exclusive_run(repo_dir: Path, deadline: float = 0.0) -> Iterator[None]:
    """Hold the project's pipeline lock for one flow run. A second run started meanwhile in
    the same checkout waits until `deadline` (time.monotonic; by default not at all), then
    is refused with one sentence instead of interleaving its stages."""
    path = repo_dir / ".dvc" / "tmp" / "distill-pipeline.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:  # the lock is released by the OS if its holder dies
            _until(deadline, lambda: fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB), BlockingIOError)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise ProjectBusy(f"{path}: another pipeline run ({holder}) is running in this checkout; "
                              "wait for it to finish") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _retry_unless_user_error(task, task_run, state) -> bool:
    try:
        state.result()
    except UserError:
        return False
    except Exception:
        return True
    return False


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_unless_user_error)
def run_stage(stage: str, repo_dir: str, force: bool, pipeline_run: str, wait_for_lock: bool = False):
    """Run one DVC stage with `dvc repro --single-item`, streaming its output to the log; with
    `wait_for_lock`, DVC waits for a lock another dvc command holds instead of failing."""
    cmd = [str(BIN / "dvc"), *(["--wait-for-lock"] if wait_for_lock else []), "repro", "--single-item", stage,
           *(["--force"] if force else [])]
    # DISTILL_PIPELINE_RUN groups this flow run's stage runs under one MLflow parent run.
    env = tool_env(DISTILL_PIPELINE_RUN=pipeline_run)
    # On a terminal the stage's own output (epoch and batch bars) shows as it comes; its lines
    # then go to the Prefect UI only, not a second time to the terminal.
    terminal = progress_shown()
    logger = _ui_only_logger() if terminal else get_run_logger()
    code, lines = run_streaming(cmd, repo_dir, env, logger.info, terminal)
    output = "\n".join(lines)
    if code != 0:
        if re.search(rf"exited with {EXIT_USER_ERROR}\b", output):
            raise UserError(f"stage {stage}: {stage_error(lines) or output[-300:]}")
        raise StageFailed(f"stage {stage} failed (dvc exit {code}): {output[-500:]}")
    return "ran" if f"Running stage '{stage}'" in output else _reused()


def _ui_only_logger() -> logging.LoggerAdapter:
    """The task's log in the Prefect UI, without Prefect's copy on the terminal."""
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger("distill.stage_output")
    if not logger.handlers:
        logger.addHandler(APILogHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logging.LoggerAdapter(logger, get_run_logger().extra)


@task
def reused_stage(stage: str):
    """A stage DVC reports up to date before the flow started: nothing to run."""
    return _reused()


def _reused():
    """The distinct state of a stage DVC did not recompute (its result is "reused")."""
    return Completed(name="Reused", message="up to date in DVC's cache", data="reused")


@flow(name="distill-pipeline")
def pipeline(overrides: dict[str, Any] | None = None, force: bool = False, repo_dir: str | None = None,
             wait_for_lock_s: float = 0.0):
    """Run the DVC pipeline; returns {stage: "ran" | "reused"}.

    Args:
        overrides: params.yaml changes as {"student.temperature": 2}, applied like
            `dvc exp run -S` before the run (and left in params.yaml, as DVC does).
        force: rerun every stage even if DVC's cache has it (`dvc repro -f`).
        repo_dir: the project directory (default: this checkout).
        wait_for_lock_s: how long to wait for a busy project (another run, a dvc command);
            0 refuses at once with a UserError, more ends the run `Skipped` after the wait.
    """
    root = Path(repo_dir or pipelines.PROJECT_DIR).resolve()
    try:
        return _run(root, overrides, force, wait_for_lock_s)
    except ProjectBusy as exc:
        if wait_for_lock_s <= 0:
            raise
        get_run_logger().warning("skipped after waiting %.0f s: %s", wait_for_lock_s, exc)
        return Cancelled(name="Skipped", message=f"the project stayed busy for {wait_for_lock_s:.0f} s: {exc}")


def _run(root: Path, overrides: dict[str, Any] | None, force: bool, wait_s: float) -> dict:
    """The flow's body: the stages in order, each run or reused, then the comparison artifact."""
    deadline = time.monotonic() + wait_s
    with exclusive_run(root, deadline):
        params = root / "params.yaml"
        _waiting_for_dvc(root, deadline, _dvc_lock_free)  # before params.yaml changes, not after
        original = params.read_text()
        if overrides:
            params_overrides.apply(params, overrides)
        load_params(params, task=None)  # bad params fail here, once, before any stage
        try:
            order, changed = dvc_plan(root, deadline)
        except ProjectBusy:
            params.write_text(original)  # nothing ran: the run leaves params.yaml as it found it
            raise
        wait = wait_s > 0  # a run that waits for a busy project waits at every stage too
        pipeline_run = f"prefect-{prefect.runtime.flow_run.id}"
        outcome: dict[str, str] = {}
        upstream_ran = False
        for stage in order:
            if not force and not upstream_ran and stage not in changed:
                state = reused_stage.with_options(task_run_name=stage)(stage, return_state=True)
            else:
                state = run_stage.with_options(task_run_name=stage)(stage, str(root), force, pipeline_run, wait,
                                                                    return_state=True)
            outcome[stage] = state.result()
            upstream_ran |= outcome[stage] == "ran"
    get_run_logger().info("stages: %s", outcome)
    _comparison_artifact(root, outcome)
    return outcome


def _comparison_artifact(root: Path, outcome: dict[str, str]) -> None:
    """The run's results on its Prefect page: which stages ran, and evaluate's comparison (compare.md)."""
    compare = evaluate_file(root, "compare")
    stages = ", ".join(f"{stage} {result}" for stage, result in outcome.items())
    table = (root / compare).read_text() if (root / compare).is_file() else f"(no {compare})"
    create_markdown_artifact(markdown=f"Stages: {stages}\n\n{table}\nReport: {root / evaluate_file(root, 'report')}\n",
                             key=COMPARISON_ARTIFACT, description="teacher, student and baseline on the test split")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params.yaml override")
    parser.add_argument("--force", action="store_true", help="rerun every stage")
    args = parser.parse_args(argv)
    return pipeline(overrides=params_overrides.parse(args.set), force=args.force)


if __name__ == "__main__":
    from stages.common import cli_main

    raise SystemExit(cli_main(main))
