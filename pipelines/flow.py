"""The pipeline flow: the DVC DAG run stage by stage as Prefect tasks.

DVC decides what must run; this flow only orders and observes it. Each DVC stage
is one task, in dependency order. A stage that DVC reports up to date is not run
and finishes in a `Reused` state; a stage that runs is `dvc repro --single-item`,
its output streamed into the task's log, so dvc.lock ends exactly as `dvc repro`
would leave it.

    python -m pipelines.flow                                   # like dvc repro
    python -m pipelines.flow --set student.temperature=2       # like dvc exp run -S
    python -m pipelines.flow --force                           # like dvc repro -f
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pipelines  # noqa: F401  (project-local Prefect settings, before Prefect is imported)
import prefect.runtime
from prefect import flow, get_run_logger, task
from prefect.states import Completed

from distill.config import load_params
from distill.errors import EXIT_USER_ERROR, UserError
from distill.progress import bar
from pipelines import overrides as params_overrides
from pipelines.tools import BIN, stage_error, tool_env


class StageFailed(RuntimeError):
    """A stage command failed for a reason that may pass on retry (killed, lock held)."""


def dvc_plan(repo_dir: Path) -> tuple[list[str], set[str]]:
    """The stage names in dependency order (ties kept in dvc.yaml order), and the names
    of those `dvc status` reports as changed, from one in-process look at the repo."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(repo_dir)) as repo:
        position = {stage: i for i, stage in enumerate(repo.index.stages)}
        # DVC's edges point from a stage to the stages it depends on: reverse them.
        order = nx.lexicographical_topological_sort(repo.index.graph.reverse(), key=position.__getitem__)
        return [stage.name for stage in order], {name.rsplit(":", 1)[-1] for name in repo.status()}


@contextmanager
def exclusive_run(repo_dir: Path) -> Iterator[None]:
    """Hold the project's pipeline lock for one flow run: a second run started at once in
    the same checkout is refused with one sentence instead of interleaving its stages."""
    path = repo_dir / ".dvc" / "tmp" / "distill-pipeline.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the OS if this process dies
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise UserError(f"{path}: another pipeline run ({holder}) is running in this checkout; "
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
def run_stage(stage: str, repo_dir: str, force: bool, pipeline_run: str):
    """Run one DVC stage with `dvc repro --single-item`, streaming its output to the log."""
    logger = get_run_logger()
    cmd = [str(BIN / "dvc"), "repro", "--single-item", stage] + (["--force"] if force else [])
    # DISTILL_PIPELINE_RUN groups this flow run's stage runs under one MLflow parent run.
    env = tool_env(DISTILL_PIPELINE_RUN=pipeline_run)
    proc = subprocess.Popen(cmd, cwd=repo_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip())
        logger.info(line.rstrip())
    output = "\n".join(lines)
    if proc.wait() != 0:
        if re.search(rf"exited with {EXIT_USER_ERROR}\b", output):
            raise UserError(f"stage {stage}: {stage_error(lines) or output[-300:]}")
        raise StageFailed(f"stage {stage} failed (dvc exit {proc.returncode}): {output[-500:]}")
    return "ran" if f"Running stage '{stage}'" in output else _reused()


@task
def reused_stage(stage: str):
    """A stage DVC reports up to date before the flow started: nothing to run."""
    return _reused()


def _reused():
    """The distinct state of a stage DVC did not recompute (its result is "reused")."""
    return Completed(name="Reused", message="up to date in DVC's cache", data="reused")


@flow(name="distill-pipeline")
def pipeline(overrides: dict[str, Any] | None = None, force: bool = False, repo_dir: str | None = None) -> dict:
    """Run the DVC pipeline; returns {stage: "ran" | "reused"}.

    Args:
        overrides: params.yaml changes as {"student.temperature": 2}, applied like
            `dvc exp run -S` before the run (and left in params.yaml, as DVC does).
        force: rerun every stage even if DVC's cache has it (`dvc repro -f`).
        repo_dir: the project directory (default: this checkout).
    """
    root = Path(repo_dir or pipelines.PROJECT_DIR).resolve()
    with exclusive_run(root):
        if overrides:
            params_overrides.apply(root / "params.yaml", overrides)
        load_params(root / "params.yaml")  # bad params fail here, once, before any stage
        order, changed = dvc_plan(root)
        pipeline_run = f"prefect-{prefect.runtime.flow_run.id}"
        outcome: dict[str, str] = {}
        upstream_ran = False
        with bar(len(order), "pipeline", unit="stage") as progress:
            for stage in order:
                progress.set_postfix_str(stage)
                if not force and not upstream_ran and stage not in changed:
                    state = reused_stage.with_options(task_run_name=stage)(stage, return_state=True)
                else:
                    state = run_stage.with_options(task_run_name=stage)(stage, str(root), force, pipeline_run,
                                                                        return_state=True)
                outcome[stage] = state.result()
                upstream_ran |= outcome[stage] == "ran"
                progress.update()
    get_run_logger().info("stages: %s", outcome)
    return outcome


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params.yaml override")
    parser.add_argument("--force", action="store_true", help="rerun every stage")
    args = parser.parse_args(argv)
    return pipeline(overrides=params_overrides.parse(args.set), force=args.force)


if __name__ == "__main__":
    from stages.common import cli_main

    raise SystemExit(cli_main(main))
