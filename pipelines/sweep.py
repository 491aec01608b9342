"""A sweep fanned out on Dask: one Prefect task per grid point, each one DVC experiment.

The flow runs on prefect-dask's DaskTaskRunner: a LocalCluster started for the run
(`workers` processes, one thread each) when no address is given, or the running Dask
scheduler at `address`. Each task runs one point as an ordinary DVC experiment, in a
private clone of the project that shares its DVC cache (experiments.run_in_clone), and
pushes it back, so `dvc exp show` lists every point; the stages log to MLflow as in any
run. The flow then reads each point's metrics from its experiment and returns one
comparison table (experiments.summary).

    python -m pipelines.sweep --set student.temperature=1,2,4                      # LocalCluster, 2 workers
    python -m pipelines.sweep --set student.temperature=1,2,4 --workers 3
    python -m pipelines.sweep --set student.temperature=1,2,4 --address tcp://scheduler:8786
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import pipelines  # noqa: F401  (project-local Prefect settings, before Prefect is imported)
import prefect.runtime
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect_dask import DaskTaskRunner

from distill import experiments
from distill.errors import UserError

# Passed from the submitting process to each task: a Dask worker elsewhere has its own environment.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI",)


def task_runner(address: str | None = None, workers: int = 2) -> DaskTaskRunner:
    """The Dask scheduler at `address`, or a LocalCluster of `workers` processes, one thread each."""
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          # on loopback, like the scheduler; another free port if taken
                                          "dashboard_address": "127.0.0.1:8787"})


@task(cache_policy=NO_CACHE)  # every call is a run; DVC decides what it reuses
def run_point(repo_dir: str, name: str, overrides: dict[str, str], baseline: str, patch: bytes,
              env: dict[str, str]) -> dict:
    """One grid point: one DVC experiment, run where Dask placed this task (experiments.run_in_clone)."""
    from distributed import get_worker

    logger = get_run_logger()
    worker = get_worker()  # raises outside a Dask worker
    started = time.time()
    rev = experiments.run_in_clone(Path(repo_dir), name, overrides, baseline, patch, log=logger.info,
                                   extra_env=env)
    return {"name": name, "overrides": overrides, "rev": rev, "worker": worker.address,
            "scheduler": worker.scheduler.address, "pid": os.getpid(), "started": started,
            "finished": time.time()}


@flow(name="distill-sweep", task_runner=task_runner())
def sweep_flow(points: list[dict[str, str]], prefix: str = "sweep", repo_dir: str | None = None) -> dict:
    """Run every point as a parallel task; return {"summary": markdown table, "points": [where each ran]}.

    The task runner is chosen by the caller (run_sweep: `sweep_flow.with_options(task_runner=...)`);
    by default a LocalCluster of 2 workers.
    """
    root = Path(repo_dir or pipelines.PROJECT_DIR).resolve()
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
    wait(futures)
    done, failed = [], []
    for name, future in zip(names, futures):
        outcome = future.result(raise_on_failure=False)
        if future.state.is_completed():
            done.append(outcome)
        else:
            failed.append(str(outcome) if isinstance(outcome, UserError) else f"{name}: {outcome!r}")
    table = experiments.summary([(p["name"], p["overrides"], experiments.metrics(root, p["name"])) for p in done])
    logger = get_run_logger()
    logger.info("sweep of %d points on Dask:\n%s", len(points), table)
    if failed:
        raise UserError(f"{len(failed)} of {len(points)} sweep points failed (any others are in dvc exp show): "
                        + "; ".join(failed))
    return {"summary": table, "points": done}


def run_sweep(axes: dict[str, list[str]], address: str | None = None, workers: int = 2, prefix: str = "sweep",
              repo_dir: str | None = None) -> dict:
    """The grid over `axes`, every point checked first, then sweep_flow on the chosen Dask task runner."""
    root = Path(repo_dir or pipelines.PROJECT_DIR).resolve()
    points = experiments.grid(axes)
    for point in points:
        experiments.check_point(root, point)  # a bad point fails here, before any cluster starts
    if workers < 1:
        raise UserError(f"workers = {workers}: at least 1")
    return sweep_flow.with_options(task_runner=task_runner(address, workers))(
        points=points, prefix=prefix, repo_dir=str(root))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2", help="an axis of the grid")
    parser.add_argument("--address", help="a running Dask scheduler (default: a LocalCluster for this run)")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes (default 2)")
    parser.add_argument("--prefix", default="sweep", help="experiment name prefix")
    args = parser.parse_args(argv)
    result = run_sweep(experiments.parse_axes(args.set), args.address, args.workers, args.prefix)
    print(result["summary"])
    return result


if __name__ == "__main__":
    from distill.cli import cli_main

    raise SystemExit(cli_main(main))
