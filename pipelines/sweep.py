"""The sweep: a grid of params overrides, one Prefect task per point, each one DVC experiment.

One engine, two runners. By default the points run in this process's thread pool
(Prefect's ThreadPoolTaskRunner, `workers` points at a time; the work itself is in
`dvc exp run` subprocesses). With `dask=True` they run on prefect-dask's
DaskTaskRunner: a LocalCluster started for the run (`workers` processes, one thread
each), or the running Dask scheduler at `address`. Either way each task runs one
point as an ordinary DVC experiment, in a private clone of the project that shares
its DVC cache (experiments.run_in_clone), and pushes it back, so `dvc exp show` lists
every point; the stages log to MLflow as in any run. The flow then reads each point's
metrics from its experiment and returns one comparison table (experiments.summary).

    python -m pipelines.sweep --set student.temperature=1,2,4                      # 1 point at a time, here
    python -m pipelines.sweep --set student.temperature=1,2,4 --dask --workers 3   # LocalCluster, 3 workers
    python -m pipelines.sweep --set student.temperature=1,2,4 --address tcp://scheduler:8786
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import pipelines  # noqa: F401  (project-local Prefect settings, before Prefect is imported)
import prefect.runtime
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from distill.errors import UserError
from pipelines import experiments, lifecycle, overrides, prefect_server

# Passed from the submitting process to each task: a Dask worker elsewhere has its own environment.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI",)


def task_runner(workers: int = 1, dask: bool = False, address: str | None = None) -> TaskRunner:
    """Where the points run: `workers` threads here; with `dask`, a LocalCluster of `workers`
    processes (one thread each); with `address`, the Dask scheduler there."""
    if not dask and not address:
        return ThreadPoolTaskRunner(max_workers=workers)
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          # on loopback, like the scheduler; another free port if taken
                                          "dashboard_address": "127.0.0.1:8787"})


def _where() -> dict:
    """The Dask worker and scheduler running this task; empty in a thread pool."""
    try:
        from distributed import get_worker

        worker = get_worker()  # raises outside a Dask worker
    except (ImportError, ValueError):
        return {}
    return {"worker": worker.address, "scheduler": worker.scheduler.address}


def _not_again(task, task_run, state) -> bool:
    return False


# Every call is a run (DVC decides what it reuses). A point is not tried again; the one retry
# allowed, with a condition that always says no, keeps Prefect from logging a refused point's
# state with an empty traceback ("NoneType: None"), which it does when no retry is allowed.
@task(cache_policy=NO_CACHE, retries=1, retry_condition_fn=_not_again)
def run_point(repo_dir: str, name: str, overrides: dict[str, str], baseline: str, patch: bytes,
              env: dict[str, str]) -> dict:
    """One grid point: one DVC experiment, run where the task runner placed this task (experiments.run_in_clone)."""
    logger = get_run_logger()
    if lifecycle.stopping():  # the sweep is being stopped: a point not started stays so
        return lifecycle.refused(UserError(f"{name}: not started, the sweep was stopped"))
    started = time.time()
    try:
        rev = experiments.run_in_clone(Path(repo_dir), name, overrides, baseline, patch, log=logger.info,
                                       extra_env=env)
    except UserError as exc:  # the point's state says the sentence; no traceback in its log
        return lifecycle.refused(exc)
    return {"name": name, "overrides": overrides, "rev": rev, "pid": os.getpid(), "started": started,
            "finished": time.time(), **_where()}


@flow(name="distill-sweep", task_runner=task_runner())
def sweep_flow(points: list[dict[str, str]], prefix: str = "sweep", repo_dir: str | None = None) -> dict:
    """Run every point as a parallel task; return {"summary": markdown table, "points": [where each ran]}.

    The task runner is chosen by the caller (run_sweep: `sweep_flow.with_options(task_runner=...)`);
    by default one point at a time in this process.
    """
    lifecycle.reclaim_signals()
    with lifecycle.recorded_flow_run(prefect.runtime.flow_run.id):
        return _sweep(points, prefix, Path(repo_dir or pipelines.PROJECT_DIR).resolve())


def _sweep(points: list[dict[str, str]], prefix: str, root: Path) -> dict:
    """sweep_flow's body: the points submitted, each said as it finishes, then the table."""
    names = [experiments.point_name(prefix, point) for point in points]
    for name in names:
        experiments.remove(root, name)  # a point run again replaces its earlier experiment
    baseline, patch = experiments.workspace_state(root)
    flow_run = prefect.runtime.flow_run.id
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    futures = [
        # DISTILL_PIPELINE_RUN groups each point's MLflow stage runs under a parent run of its own.
        run_point.with_options(task_run_name=name).submit(
            str(root), name, point, baseline, patch, env | {"DISTILL_PIPELINE_RUN": f"prefect-{flow_run}-{name}"})
        for name, point in zip(names, points)
    ]
    logger = get_run_logger()
    logger.info("sweep of %d points: %s", len(points), ", ".join(names))
    headline = experiments.project_task(root).headline  # what each point is shown by
    done, failed, rows = [], [], []
    lifecycle.on_interrupt(lambda: _interrupted(root, names, rows, headline))
    for finished, future in enumerate(as_completed(futures), 1):  # each point's result as soon as it is in
        name = names[futures.index(future)]
        outcome = future.result(raise_on_failure=False)
        if future.state.is_completed():
            done.append(outcome)
            try:
                rows.append((name, outcome["overrides"], experiments.metrics(root, outcome["rev"])))
                said = experiments.one_line(name, rows[-1][2], headline)
            except (UserError, KeyError, ValueError) as exc:  # the table at the end says it again, or fails
                said = f"{name}: finished, but its metrics could not be read yet ({exc})"
            logger.info("[%d/%d] %s", finished, len(points), said)
        else:
            failed.append(str(outcome) if isinstance(outcome, UserError) else f"{name}: {outcome!r}")
            logger.warning("[%d/%d] %s failed: %s", finished, len(points), name, failed[-1])
    done.sort(key=lambda p: names.index(p["name"]))
    table = experiments.summary([(p["name"], p["overrides"], experiments.metrics(root, p["rev"])) for p in done],
                                headline)
    logger.info("sweep of %d points:\n%s", len(points), table)
    if failed:
        refusal = UserError(f"{len(failed)} of {len(points)} sweep points failed (any others are in dvc exp show): "
                            + "; ".join(failed))
        return lifecycle.refused(refusal)  # the sentence, no traceback
    return {"summary": table, "points": done}


def _interrupted(root: Path, names: list[str], rows: list, headline) -> str:
    """What an interrupted sweep says: where its finished points are, their table; the unfinished
    points' clones (whose own clean-up did not run) are removed."""
    for name in names:
        for clone in (root / experiments.CLONES).glob(f"{name}-*"):
            shutil.rmtree(clone, ignore_errors=True)
    if not rows:
        return "no sweep point had finished; none is in dvc exp show"
    return (f"{len(rows)} of {len(names)} sweep points had finished (dvc exp show lists them):\n"
            + experiments.summary(sorted(rows, key=lambda row: names.index(row[0])), headline))


def _loopback(address: str) -> bool:
    """Whether a tcp:// or http:// address is this machine's loopback."""
    from urllib.parse import urlsplit

    host = urlsplit(address if "//" in address else f"tcp://{address}").hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def _no_worker_restarts() -> None:
    """A stopped sweep's local Dask nannies (in this process) do not start again the workers it stops."""
    from distributed import Nanny

    for nanny in list(Nanny._instances):
        nanny.close_gracefully(reason="the sweep was stopped")


def run_sweep(axes: dict[str, list[str]], workers: int | None = None, dask: bool = False, address: str | None = None,
              prefix: str | None = None, repo_dir: str | None = None) -> dict:
    """The grid over `axes`, every point checked first, then sweep_flow on the chosen task runner:
    `workers` points at a time here (default 1), or on Dask with `dask` or an `address` (default 2
    local workers)."""
    root = Path(repo_dir or pipelines.PROJECT_DIR).resolve()
    dask = dask or bool(address)
    workers = (2 if dask else 1) if workers is None else workers
    points = experiments.grid(axes)
    for point in points:
        overrides.check(root, point)  # a bad point fails here, before any runner starts
    if workers < 1:
        raise UserError(f"workers = {workers}: at least 1")
    if address and not _loopback(address) and _loopback(prefect_server.configured_url()):
        raise UserError(f"{address}: Dask workers on other machines cannot reach a Prefect server on 127.0.0.1; "
                        "set PREFECT_API_URL to a server they can reach (docs/scaling-out.md)")
    if dask and not address:
        lifecycle.on_stop(_no_worker_restarts)
    return sweep_flow.with_options(task_runner=task_runner(workers, dask, address))(
        points=points, prefix=prefix or experiments.default_prefix(root), repo_dir=str(root))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2", help="an axis of the grid")
    parser.add_argument("--workers", type=int, help="points at a time (default 1; with --dask: local workers, 2)")
    parser.add_argument("--dask", action="store_true", help="run the points on a LocalCluster of Dask workers")
    parser.add_argument("--address", help="run the points on the running Dask scheduler at this address")
    parser.add_argument("--prefix", help="experiment name prefix (default: sweep; sweep-lm in lm/)")
    args = parser.parse_args(argv)
    with lifecycle.command(pipelines.PROJECT_DIR):
        result = run_sweep(overrides.parse(args.set, several=True), args.workers, args.dask,
                           args.address, args.prefix)
    print(result["summary"])
    return result


if __name__ == "__main__":
    from stages.common import cli_main

    raise SystemExit(cli_main(main))
