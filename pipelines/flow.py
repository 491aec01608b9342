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
import logging
import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pipelines  # noqa: F401  (project-local Prefect settings, before Prefect is imported)
import prefect.runtime
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.states import Cancelled, Completed, Failed

from distill.config import load_params
from distill.errors import EXIT_USER_ERROR, UserError
from distill.progress import enabled as progress_shown
from pipelines import overrides as params_overrides
from pipelines.lifecycle import (ProjectBusy, command, exclusive_run, params_changed, reclaim_signals,
                                 recorded_flow_run, refused, running_stage, until)
from pipelines.dvcfile import evaluate_file
from pipelines.tools import BIN, StageCrashed, StageFailed, run_streaming, stage_error, tool_env


COMPARISON_ARTIFACT = "distill-comparison"


TRANSIENT = re.compile(r"Unable to acquire lock|database is locked|Connection refused|ConnectionError|"
                       r"ConnectTimeout|Temporary failure in name resolution|503 Service Unavailable")


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
    lifecycle.POLL_S seconds until `deadline`, then ProjectBusy."""
    from dvc.lock import LockError
    from dvc.repo import Repo

    def attempt():
        with Repo(str(repo_dir)) as repo:
            return look(repo)

    try:
        return until(deadline, attempt, LockError, lambda: "a dvc command holds DVC's lock (.dvc/tmp/lock)")
    except LockError:
        raise ProjectBusy(f"{repo_dir}: a dvc command holds DVC's lock (.dvc/tmp/lock); "
                          "run again when it has finished") from None


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


def _retry_if_transient(task, task_run, state) -> bool:
    """Prefect retries a stage only when it failed for a reason that can pass (StageFailed)."""
    try:
        state.result()
    except StageFailed:
        return True
    except BaseException:
        return False
    return False


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_if_transient)
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
    if code == 0:
        return "ran" if f"Running stage '{stage}'" in output else _reused()
    if re.search(rf"exited with {EXIT_USER_ERROR}\b", output):
        refusal = UserError(f"stage {stage}: {stage_error(lines) or output[-300:]}{_put_back(stage, repo_dir)}")
        return refused(refusal)
    if TRANSIENT.search("\n".join(lines[-5:])):  # DVC's last words, not a warning earlier in the stage
        raise StageFailed(f"stage {stage} failed (dvc exit {code}), to be tried again: {output[-300:]}")
    crash = StageCrashed(f"stage {stage} crashed (dvc exit {code}); its traceback is above: "
                         f"{(lines or [''])[-1][-300:]}")
    return Failed(message=str(crash), data=crash)


def _put_back(stage: str, repo_dir: str) -> str:
    """After a refusal: the stage's outputs of its last good run, which DVC deleted before running it,
    checked out of DVC's cache again; the words that say so (empty when there was nothing to put back)."""
    result = subprocess.run([str(BIN / "dvc"), "checkout", stage], cwd=repo_dir, env=tool_env(),
                            capture_output=True, text=True)
    restored = [line.split(None, 1)[1] for line in result.stdout.splitlines() if line[:2] in ("A ", "M ")]
    if result.returncode == 0 and restored:
        return f" (its last good outputs are back from DVC's cache: {', '.join(restored)})"
    return ""


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
            `dvc exp run -S` before the run (and left in params.yaml, as DVC does, when the run
            finishes; undone when it is refused, crashes or is interrupted).
        force: rerun every stage even if DVC's cache has it (`dvc repro -f`).
        repo_dir: the project directory (default: this checkout).
        wait_for_lock_s: how long to wait for a busy project (another run, a dvc command);
            0 refuses at once, more ends the run `Skipped` after the wait.

    A refused input (a UserError: the project busy, a bad param, a stage's one-sentence refusal)
    ends the run `Refused` (a failed state whose message is the sentence); called in-process, the
    flow raises that UserError. A crashed stage (a bug) ends it Failed; neither is retried.
    """
    root = Path(repo_dir or pipelines.PROJECT_DIR).resolve()
    try:
        reclaim_signals()
        with recorded_flow_run(prefect.runtime.flow_run.id):
            return _run(root, overrides, force, wait_for_lock_s)
    except ProjectBusy as exc:
        if wait_for_lock_s <= 0:
            return refused(exc)
        get_run_logger().warning("skipped after waiting %.0f s: %s", wait_for_lock_s, exc)
        return Cancelled(name="Skipped", message=f"the project stayed busy for {wait_for_lock_s:.0f} s: {exc}")
    except UserError as exc:
        return refused(exc)
    except (StageCrashed, StageFailed) as exc:  # its traceback is in the stage's own output, above
        return Failed(message=str(exc), data=exc)


def _run(root: Path, overrides: dict[str, Any] | None, force: bool, wait_s: float) -> dict:
    """The flow's body: the stages in order, each run or reused, then the comparison artifact. A run
    that does not finish leaves params.yaml as it found it, and says so when it had changed it."""
    deadline = time.monotonic() + wait_s
    with exclusive_run(root, deadline):
        params = root / "params.yaml"
        _waiting_for_dvc(root, deadline, _dvc_lock_free)  # before params.yaml changes, not after
        original, written = params.read_text(), {}
        try:
            outcome = _stages(root, overrides, force, wait_s, deadline, written)
        except BaseException as exc:
            if written and params.read_text() == written["after"]:  # --set changed it, and nobody since
                params.write_text(original)
                if isinstance(exc, (UserError, StageCrashed)):
                    exc.args = (f"{exc} (params.yaml is as before the run: its --set changes were undone)",)
            raise
        finally:
            params_changed(None)
    get_run_logger().info("stages: %s", outcome)
    _comparison_artifact(root, outcome)
    return outcome


def _stages(root: Path, overrides: dict[str, Any] | None, force: bool, wait_s: float, deadline: float,
            written: dict) -> dict:
    """Apply the overrides (`written["after"]`: params.yaml as they left it), check them, then each
    stage in DVC's order, run or reused; {stage: "ran" | "reused"}."""
    params = root / "params.yaml"
    if overrides:
        before = params.read_text()
        params_overrides.apply(params, overrides)
        written["after"] = params.read_text()
        params_changed((params, before, written["after"]))
    # bad params, or a user's file a stage would refuse, fail here, once, before DVC touches anything
    params_overrides.check_files(root, load_params(params, task=None))
    order, changed = dvc_plan(root, deadline)
    wait = wait_s > 0  # a run that waits for a busy project waits at every stage too
    pipeline_run = f"prefect-{prefect.runtime.flow_run.id}"
    outcome: dict[str, str] = {}
    upstream_ran = False
    for stage in order:
        running_stage(stage)
        if not force and not upstream_ran and stage not in changed:
            state = reused_stage.with_options(task_run_name=stage)(stage, return_state=True)
        else:
            state = run_stage.with_options(task_run_name=stage)(stage, str(root), force, pipeline_run, wait,
                                                                return_state=True)
        outcome[stage] = state.result()  # a refusal or a crash raises here, and ends the run
        upstream_ran |= outcome[stage] == "ran"
    running_stage(None)
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
    root = pipelines.PROJECT_DIR
    with command(root):
        return pipeline(overrides=params_overrides.parse(args.set), force=args.force, repo_dir=str(root))


if __name__ == "__main__":
    from stages.common import cli_main

    raise SystemExit(cli_main(main))
