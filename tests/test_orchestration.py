"""The orchestration in a user's hands: refusals are one line and cost nothing, Ctrl-C and
SIGTERM end everything, no run is left Running, one Prefect server per project, `--set`
changes one value only. Process-level where the point is about processes."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import BIN, REPO, git_commit, subprocess_env, tiny_params, write_params
from pipelines import lifecycle, overrides, prefect_server
from pipelines.app import app
from servers import free_port

runner = CliRunner()
NO_TEXT_COLUMN = "data/raw/reviews.csv: no text column 'text'; set data.text_column to one of ['review', 'label']"


def cli_env(project: Path, **extra: str) -> dict[str, str]:
    """The environment of a user's shell in `project`: its own Prefect home, no server running."""
    env = {k: v for k, v in subprocess_env().items() if k != "PREFECT_API_URL"}
    return env | {"PREFECT_HOME": str(project / ".prefect"), "PREFECT_PORT": str(free_port())} | extra


def reviews_without_text_column(project: Path) -> None:
    """A text data set whose params name a column the file lacks, with a real tokenizer folder."""
    (project / "data" / "raw" / "reviews.csv").write_text(
        "review,label\n" + "".join(f"{'great' if i % 2 else 'dull'} film,{i % 2}\n" for i in range(40)))
    write_params(project / "params.yaml", tiny_params(**{
        "data.source": "csv", "data.path": "data/raw/reviews.csv", "data.text_column": "text", "data.augment": "auto",
        "data.text.tokenizer": "tokenizer"}))
    from distill.text import resolve_folder

    tokenizer = project / "tokenizer"
    tokenizer.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (resolve_folder("minilm") / name).is_file():
            (tokenizer / name).write_bytes((resolve_folder("minilm") / name).read_bytes())


# ---- 1. a refusal is one line ------------------------------------------------------------------

def test_distill_run_refuses_a_missing_text_column_in_one_line_before_prefect_starts(project):
    reviews_without_text_column(project)
    started = time.monotonic()
    result = subprocess.run([str(BIN / "distill"), "run"], cwd=project, env=cli_env(project), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert (result.stdout + result.stderr).strip().splitlines() == [f"error: {NO_TEXT_COLUMN}"]
    assert time.monotonic() - started < 30  # no server was started: it takes 4-12 s
    assert not (project / ".prefect" / "temporary.db").exists()


def test_distill_sweep_refuses_it_in_one_line_too(project):
    reviews_without_text_column(project)
    result = subprocess.run([str(BIN / "distill"), "sweep", "-S", "student.alpha=0.5,0.9"], cwd=project,
                            env=cli_env(project), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert (result.stdout + result.stderr).strip().splitlines() == [f"error: {NO_TEXT_COLUMN}"]


def test_a_bad_value_in_params_yaml_is_not_reported_as_a_set_override(project, monkeypatch):
    write_params(project / "params.yaml", tiny_params(**{"student.alpha": 5}))
    monkeypatch.chdir(project)
    result = runner.invoke(app, ["run"])
    assert result.exit_code == 2
    assert "--set" not in result.output and "params.yaml" in result.output and "student.alpha" in result.output


def test_a_refusal_inside_a_stage_ends_the_flow_run_refused_with_the_sentence_and_puts_outputs_back(
        built_project, flow_module):
    """A refusal only the stage can find (a label with empty values, deep in the file): the flow run
    ends `Refused` with the stage's sentence as its state message, no traceback in its log, and the
    outputs DVC deleted before running the stage are checked out again: `dvc status` reads as before."""
    from prefect.client.orchestration import get_client

    project = built_project
    rows = "".join(f"{i % 3},{i % 5},{i % 2}\n" for i in range(60)) + "1,2,\n"  # the last label is empty
    (project / "data" / "raw" / "table.csv").write_text("f1,f2,label\n" + rows)
    write_params(project / "params.yaml", tiny_params(**{"data.source": "csv", "data.path": "data/raw/table.csv"}))
    before = dvc_status(project)
    state = flow_module.pipeline(repo_dir=str(project), return_state=True)
    assert state.name == "Refused" and state.is_failed()
    assert state.message.startswith("stage prepare: data/raw/table.csv: label column 'label' has empty values")
    assert "its last good outputs are back from DVC's cache: data/prepared/" in state.message
    assert (project / "data" / "prepared" / "train.parquet").is_file()
    assert dvc_status(project) == before

    async def logs():
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        async with get_client() as client:
            return await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))

    import asyncio

    messages = [log.message for log in asyncio.run(logs())]
    assert messages and not any("Traceback" in m for m in messages)


def dvc_status(project: Path) -> str:
    return subprocess.run([str(BIN / "dvc"), "status"], cwd=project, env=subprocess_env(), capture_output=True,
                          text=True, check=True).stdout


# ---- 7. what a run is doing is visible -----------------------------------------------------------

@pytest.mark.timed
def test_a_busy_project_is_refused_at_once_naming_the_run_that_holds_it(project):
    with lifecycle.exclusive_run(project):
        started = time.monotonic()
        result = subprocess.run([str(BIN / "distill"), "run"], cwd=project, env=cli_env(project),
                                capture_output=True, text=True, timeout=120)
        took = time.monotonic() - started
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert f"another pipeline run (pid {os.getpid()}: " in line and "is running in this checkout" in line
    assert took < 15  # before any server starts (18.6 s before); benchmarks are for speed, this is for a hang


def test_a_run_waiting_for_the_project_says_why_and_for_whom_while_it_waits(project, monkeypatch, caplog):
    monkeypatch.setattr(lifecycle, "SAY_EVERY_S", 0.2)
    monkeypatch.setattr(lifecycle, "POLL_S", 0.05)
    caplog.set_level(logging.INFO, logger="pipelines.lifecycle")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path[:0] = [sys.argv[1]]\n"
                               "from pipelines.lifecycle import exclusive_run\n"
                               "with exclusive_run(__import__('pathlib').Path(sys.argv[2])): time.sleep(1.5)",
                               str(REPO), str(project)])
    time.sleep(1.0)  # the holder has the lock
    with lifecycle.exclusive_run(project, deadline=time.monotonic() + 20):
        pass
    holder.wait(timeout=30)
    waiting = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting")]
    assert waiting and f"another pipeline run (pid {holder.pid}: " in waiting[0]


def test_prefects_lines_name_the_stage_they_are_about():
    from distill.progress import LOG_FORMAT, RunSource

    record = logging.LogRecord("prefect.task_runs", logging.INFO, __file__, 1, "Finished in state Reused()", None, None)
    record.task_run_name = "train_teacher"
    assert RunSource().filter(record)
    assert logging.Formatter(LOG_FORMAT, "%H:%M:%S").format(record)[9:] == "train_teacher Finished in state Reused()"


# ---- 8. --set changes one value ----------------------------------------------------------------------

def test_set_changes_only_the_value_comments_nulls_and_flow_lists_stay(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    overrides.apply(path, {"student.temperature": "2", "teacher.channels": "[32, 32]"})
    old, new = (REPO / "params.yaml").read_text().splitlines(), path.read_text().splitlines()
    changed = [(a, b) for a, b in zip(old, new) if a != b]
    assert len(old) == len(new) and len(changed) == 2
    assert changed[0] == ("  channels: [64, 64, 64, 64]", "  channels: [32, 32]")
    assert changed[1][1].startswith("  temperature: 2 ") and "# read by train_student only" in changed[1][1]
    assert "  feature_columns: null     # parquet / csv: null = every other numeric column" in new


# ---- 4. no run is left Running ---------------------------------------------------------------------------

def test_a_flow_run_whose_process_is_gone_is_closed_crashed_the_next_time(flow_module, tmp_path, monkeypatch):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()

    @flow(name="killed-run")
    def killed():
        return None

    async def running_run():
        from prefect.states import Running

        async with get_client() as client:
            run = await client.create_flow_run(killed, state=Running())
            return str(run.id)

    import asyncio

    run_id = asyncio.run(running_run())
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / f"{run_id}.json").write_text(json.dumps(
        {"pid": gone.pid, "started": time.time() - 60, "database": prefect_server.database(),
         "server": PREFECT_API_URL.value()}))
    assert lifecycle.close_orphans(PREFECT_API_URL.value()) == [run_id]

    async def state():
        async with get_client() as client:
            return (await client.read_flow_run(run_id)).state

    assert asyncio.run(state()).type.value == "CRASHED"
    assert not list((tmp_path / "runs").iterdir())


def test_an_mlflow_run_whose_process_is_gone_is_ended_killed_when_the_next_stage_starts(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from distill import run_logging

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.create_experiment("orphans", artifact_location=str(tmp_path / "mlruns"))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    import socket

    dead = client.create_run(experiment, tags={run_logging.TAG_PROCESS: f"{socket.gethostname()}:{gone.pid}:1.00"})
    alive = client.create_run(experiment, tags={run_logging.TAG_PROCESS: run_logging.this_process()})
    elsewhere = client.create_run(experiment, tags={run_logging.TAG_PROCESS: f"another-host:{gone.pid}:1.00"})
    assert run_logging.close_orphans(experiment) == [dead.info.run_id]
    assert client.get_run(dead.info.run_id).info.status == "KILLED"
    assert {client.get_run(r.info.run_id).info.status for r in (alive, elsewhere)} == {"RUNNING"}


# ---- 3 and 4: Ctrl-C and SIGTERM, as processes --------------------------------------------------------

def start(project: Path, *args: str) -> subprocess.Popen:
    """`distill args` in its own process group, as a terminal runs a foreground command."""
    return subprocess.Popen([str(BIN / "distill"), *args], cwd=project, env=cli_env(project), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def read_until(proc: subprocess.Popen, marker: str, limit_s: float = 400) -> list[str]:
    out, deadline = [], time.monotonic() + limit_s
    for line in proc.stdout:
        out.append(line)
        if marker in line or time.monotonic() > deadline:
            break
    assert marker in "".join(out), "".join(out[-30:])
    return out


def stopped_within(proc: subprocess.Popen, limit_s: float = 5.0) -> tuple[str, float]:
    started = time.monotonic()
    rest = proc.communicate(timeout=60)[0]
    return rest, time.monotonic() - started


def nothing_left_running(project: Path, group: int) -> None:
    import psutil

    time.sleep(0.5)
    left = [p for p in psutil.process_iter(["pid"]) if _pgid(p.pid) == group and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, [" ".join(p.cmdline()) for p in left]
    db = project / ".prefect" / "temporary.db"
    with sqlite3.connect(db) as conn:
        states = {s for (s,) in conn.execute("select state_type from flow_run")}
        task_states = {s for (s,) in conn.execute("select state_type from task_run")}
    assert states and "RUNNING" not in states and "PENDING" not in states, states
    assert "RUNNING" not in task_states, task_states
    mlflow_db = project / "mlflow.db"
    if mlflow_db.is_file():
        with sqlite3.connect(mlflow_db) as conn:
            running = conn.execute("select name, start_time, end_time from runs where status = 'RUNNING'").fetchall()
            assert not running, running


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def long_training(project: Path) -> None:
    write_params(project / "params.yaml", tiny_params(**{"teacher.epochs": 100_000, "tracking.enabled": True}))
    git_commit(project, "long teacher")


@pytest.mark.slow
@pytest.mark.timed
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_one_signal_stops_distill_run_within_seconds_and_leaves_nothing_running(project, sig, code):
    long_training(project)
    original = (project / "params.yaml").read_text()
    proc = start(project, "run", "--set", "student.alpha=0.5")
    read_until(proc, "teacher epoch 3/")
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)  # a terminal's Ctrl-C reaches the whole foreground group
    else:
        proc.send_signal(sig)  # timeout, systemd and schedulers signal the command alone
    rest, took = stopped_within(proc)
    assert proc.returncode == code and took < 5, (took, rest)
    assert "Traceback" not in rest and "Crash detected" not in rest and "Unable to connect" not in rest, rest
    assert f"interrupted ({sig.name}): every process this command started was stopped; params.yaml is as before " \
           "the command (its --set changes were undone); stage train_teacher did not finish" in rest
    assert (project / "params.yaml").read_text() == original
    nothing_left_running(project, proc.pid)
    with sqlite3.connect(project / "mlflow.db") as conn:  # the stopped stage's run says it was stopped
        assert conn.execute("select status from runs where name = 'train_teacher'").fetchall() == [("KILLED",)]


@pytest.mark.slow
@pytest.mark.timed
@pytest.mark.parametrize("runner", [["-j", "2"], ["--dask"]], ids=["threads", "dask"])
def test_one_ctrl_c_stops_a_parallel_sweep_and_summarises_the_points_that_finished(project, runner):
    write_params(project / "params.yaml", tiny_params(**{"tracking.enabled": True}))
    git_commit(project, "tracked")
    # one quick point, one that trains far longer than the test
    proc = start(project, "sweep", *runner, "-S", "teacher.epochs=4,100000")
    out = read_until(proc, "[1/2] sweep-epochs4")  # the long point trains meanwhile
    os.killpg(proc.pid, signal.SIGINT)
    rest, took = stopped_within(proc)
    assert proc.returncode == 130 and took < 5, (took, rest)
    assert "Traceback" not in rest and "Crash detected" not in rest and "Unable to connect" not in rest, rest
    assert "1 of 2 sweep points had finished (dvc exp show lists them):" in rest
    assert "| sweep-epochs4 |" in rest and "| sweep-epochs100000 |" not in rest
    # each point's lines name it
    assert any("sweep-epochs100000" in line and "teacher epoch" in line for line in out + rest.splitlines())
    nothing_left_running(project, proc.pid)
    assert not list((project / ".dvc" / "tmp" / "exps" / "clones").glob("sweep-*"))


# ---- 5. one Prefect server per project ---------------------------------------------------------------

@pytest.fixture
def project_server(project):
    """The project's own Prefect server (as `make server` starts it) on a free port; its env and url."""
    port = free_port()
    env = cli_env(project, PREFECT_PORT=str(port))
    log = (project / "server.log").open("w")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while not prefect_server.answers(url):
            assert server.poll() is None and time.monotonic() < deadline, (project / "server.log").read_text()
            time.sleep(0.5)
        yield env, url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


@pytest.mark.slow
@pytest.mark.timed
def test_ctrl_c_stops_distill_serve_with_its_schedule_paused(project, project_server):
    env, url = project_server
    proc = subprocess.Popen([str(BIN / "distill"), "serve", "--cron", "0 3 * * *", "--name", "nightly-test"],
                            cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    read_until(proc, "is being served", limit_s=120)
    time.sleep(5)  # the runner's loop is up (an interrupt in its first instant is asyncio's noise, not ours)
    os.killpg(proc.pid, signal.SIGINT)
    rest, took = stopped_within(proc)
    assert proc.returncode == 130 and took < 10, (took, rest)
    assert "interrupted: the schedule of distill-pipeline/nightly-test is paused" in rest and "Traceback" not in rest
    deployment = json.load(urllib.request.urlopen(f"{url}/deployments/name/distill-pipeline/nightly-test", timeout=10))
    assert deployment["paused"] is True


@pytest.mark.slow
def test_with_the_projects_server_up_the_cli_uses_it_and_no_other_server_touches_its_database(project, project_server):
    env, url = project_server
    result = subprocess.run([str(BIN / "distill"), "run"], cwd=project, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    request = urllib.request.Request(f"{url}/flow_runs/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    runs = json.load(urllib.request.urlopen(request, timeout=10))
    assert [(r["name"], r["state_type"]) for r in runs if r["state_type"] == "COMPLETED"]
    assert not (project / ".prefect" / "temporary.db").exists()  # no temporary server
    assert "database is locked" not in (project / "server.log").read_text()
    # an activated shell's `prefect` commands talk to the project's server
    activate = project / "activate"
    activate.write_text("")
    prefect_server.add_to_activate(activate, project, env["PREFECT_PORT"])
    shown = subprocess.run(["bash", "-c", f"source {activate} && {BIN / 'prefect'} flow-run ls"], cwd="/",
                           env={k: v for k, v in env.items() if not k.startswith("PREFECT_")}, capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0 and runs[0]["id"][:8] in shown.stdout, shown.stdout + shown.stderr


@pytest.mark.slow
def test_without_a_server_a_temporary_one_works_on_a_database_of_its_own(project):
    result = subprocess.run([str(BIN / "distill"), "run"], cwd=project, env=cli_env(project), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (project / ".prefect" / "temporary.db").is_file()
    assert not (project / ".prefect" / "prefect.db").exists()  # the project server's database is not touched
    assert "Error logging to API" not in result.stderr and "Traceback" not in result.stderr


def test_once_its_resource_tracker_is_stopped_a_command_never_relaunches_it():
    """An interrupt kills multiprocessing's resource tracker last; a semaphore this process lets go
    afterwards (a Dask nanny closing) must not relaunch it, or the new tracker prints a traceback
    for each semaphore it never saw."""
    script = """
import gc, multiprocessing, psutil
from pipelines import lifecycle
ctx = multiprocessing.get_context("spawn")
locks = [ctx.Lock() for _ in range(3)]  # registered with the tracker, which starts
assert any(lifecycle._is_resource_tracker(p) for p in psutil.Process().children())
lifecycle._stop_resource_trackers(None)
del locks
gc.collect()  # each lock unregisters itself
ctx.Lock()
print("trackers left:", sum(lifecycle._is_resource_tracker(p) for p in psutil.Process().children()))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "trackers left: 0", done.stdout
    assert "relaunching" not in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_stopped_dask_sweep_tells_its_nannies_not_to_start_their_workers_again():
    from distributed import LocalCluster

    from pipelines.sweep import _no_worker_restarts

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        nanny = next(iter(cluster.workers.values()))
        worker = nanny.process.process.pid
        _no_worker_restarts()
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while nanny.process is not None and nanny.process.process is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # a restart would have started a new process by now
        assert nanny.process is None or nanny.process.process is None or nanny.process.process.pid == worker
