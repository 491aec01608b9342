"""A pipeline command from start to end: the Prefect server it uses, the flow runs it owns, and
how it stops.

`command()` wraps `distill run`, `sweep` and `serve` (and python -m pipelines.flow):

- first, flow runs that a process now gone left Running are closed (Crashed), so a killed
  run does not stay Running in the UI for ever;
- the Prefect server is chosen (pipelines.prefect_server: the project's, or a temporary one);
- one Ctrl-C (SIGINT), SIGTERM or SIGHUP ends everything within seconds: every process the
  command started is stopped (a stage ends its MLflow run KILLED on the way out), the
  command's flow runs and their unfinished task runs end Cancelled, params.yaml is put back as
  it was before the run's `--set` (unless the user edited it meanwhile), one line says what
  state the workspace is in (then what the command adds: a sweep's finished points), and the
  command exits 130 (143 for SIGTERM, 129 for SIGHUP).

Each flow run of the project records itself (`recorded_flow_run`) in .prefect/runs/ while it
runs: {pid, process start time, server}; that is how a command knows its own runs, and how
a later one finds runs whose process has gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from distill.errors import UserError
from distill.io import process_id, process_running
from pipelines import prefect_server, tools

EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}  # 128 + the signal, as a shell says
POLL_S = 2.0  # how often a waiting run looks at a busy lock again
SAY_EVERY_S = 60.0  # a run waiting for a busy project says so this often
STOP_WAIT_S = 3.0  # how long stopped processes get to end their runs before they are killed
# the running stage, the command's own lines, what it does first when stopped, its handler, params.yaml as
# changed by the run, whether it is stopping
_now: dict = {"stage": None, "extra": [], "first": [], "handler": None, "params": None, "stopping": False}


def home() -> Path:
    """The project's Prefect home (.prefect; pipelines/__init__ sets PREFECT_HOME)."""
    return Path(os.environ["PREFECT_HOME"])


def _runs_dir() -> Path:
    return home() / "runs"


@contextlib.contextmanager
def recorded_flow_run(flow_run_id: str | None) -> Iterator[None]:
    """Record the running flow run (this process, its server) in .prefect/runs/ until it ends."""
    if not flow_run_id:
        yield
        return
    path = _runs_dir() / f"{flow_run_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    pid, started = process_id()
    path.write_text(json.dumps({"pid": pid, "started": started, "database": prefect_server.database(),
                                "server": prefect_server.configured_url()}))
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


def reclaim_signals() -> None:
    """Inside a flow run of a command: SIGTERM stops the command as Ctrl-C does. Prefect's flow
    engine installs a SIGTERM handler of its own, which would crash the run ("Crash detected!")
    and leave the stage processes to their fate; a deployment's run (no command) keeps Prefect's."""
    if _now["handler"] is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _now["handler"])


def running_stage(stage: str | None) -> None:
    """Tell an interrupt which stage is running (None: none)."""
    _now["stage"] = stage


def on_interrupt(say: Callable[[], str]) -> None:
    """Add what `say()` returns to what an interrupt prints (a sweep: its finished points)."""
    _now["extra"].append(say)


def on_stop(action: Callable[[], None]) -> None:
    """Run `action()` when the command is stopped, before its processes are (a sweep on a local Dask
    cluster: the nannies are told not to start their workers again)."""
    _now["first"].append(action)


def params_changed(change: tuple[Path, str, str] | None) -> None:
    """Tell an interrupt that this run changed params.yaml (`--set`): (path, before, after); it puts
    `before` back, unless the file no longer reads `after` (the user edited it meanwhile). None: no
    change (any more)."""
    _now["params"] = change


def stopping() -> bool:
    """Whether the command is being stopped: a sweep point not started yet is not started."""
    return _now["stopping"]


@contextlib.contextmanager
def command(root: Path, temporary_server: bool = True, signals: bool = True) -> Iterator[str]:
    """The command's life (module docstring): yields the Prefect server's address. Without
    `temporary_server` (serve) the project's server, or PREFECT_API_URL's, must answer; without
    `signals` (serve: Prefect's runner stops gracefully, cancelling its runs and pausing its
    schedule) the signals are left to the command."""
    _now["handler"] = _stop if signals else None
    previous = {sig: signal.signal(sig, _stop) for sig in EXIT_INTERRUPTED} if signals else {}
    try:  # the handlers are in place before a temporary server starts: no signal leaves it behind
        url = prefect_server.connect(home(), temporary=temporary_server)
        close_orphans(url)
        yield url
    finally:
        prefect_server.stop_temporary()
        for sig, old in previous.items():
            signal.signal(sig, old)
        _now.update(stage=None, extra=[], first=[], handler=None, params=None, stopping=False)


def _stop(signum, frame) -> None:
    """The first SIGINT, SIGTERM or SIGHUP: the module docstring's ending, then the exit."""
    for sig in EXIT_INTERRUPTED:  # a second Ctrl-C while stopping changes nothing
        signal.signal(sig, signal.SIG_IGN)
    _now["stopping"] = True
    logging.disable(logging.CRITICAL)  # other threads (sweep points) say no more: these lines are the last
    for fd in list(tools.STREAMS):  # a stage's last lines must not block on our reading loop, stopped here
        with contextlib.suppress(OSError):
            os.close(fd)
    for action in _now["first"]:
        with contextlib.suppress(Exception):
            action()
    stopped = stop_children()
    cancel_flow_runs({os.getpid(), *stopped}, f"interrupted by {signal.Signals(signum).name}")
    lines = [f"interrupted ({signal.Signals(signum).name}): every process this command started was stopped; "
             + _workspace()]
    for say in _now["extra"]:
        with contextlib.suppress(Exception):
            lines.append(say())
    sys.stderr.write("\n".join(line for line in lines if line) + "\n")
    sys.stderr.flush()
    prefect_server.stop_temporary(quick=True)
    os._exit(EXIT_INTERRUPTED[signal.Signals(signum)])


def _workspace() -> str:
    """The interrupt's one line on the workspace: params.yaml, and the stage that did not finish."""
    said = "params.yaml is as before the command"
    if _now["params"] is not None:
        path, before, after = _now["params"]
        if path.is_file() and path.read_text() == after:
            path.write_text(before)
            said += " (its --set changes were undone)"
        else:
            said = "params.yaml was edited during the run: left as it is now"
    if _now["stage"]:
        said += (f"; stage {_now['stage']} did not finish and left no output (`dvc checkout {_now['stage']}` "
                 "puts its last ones back; running again resumes from DVC's cache)")
    return said


def stop_children() -> set[int]:
    """SIGTERM to every process this one started (not the temporary Prefect server: the runs are
    still to be closed on it), SIGKILL to those still there after STOP_WAIT_S; then again for any
    started meanwhile (a sweep thread between two commands); multiprocessing's resource trackers last.
    Their pids. Only for a command about to exit: this process no longer speaks to its own tracker."""
    import psutil

    server, stopped = prefect_server.temporary_pid(), set()
    for _ in range(4):
        # multiprocessing's resource trackers (Dask workers') are not among them: stopped while their users
        # live, one is relaunched by the first semaphore a user lets go, and prints tracebacks about the
        # semaphores it never saw
        children = [p for p in psutil.Process().children(recursive=True)
                    if p.pid not in {server, *stopped} and not _is_resource_tracker(p)]
        if not children:
            break
        for child in children:  # the first time politely; a process started since (a Dask nanny's new
            with contextlib.suppress(psutil.Error):  # worker) gets no time
                child.terminate() if not stopped else child.kill()
        _, alive = psutil.wait_procs(children, timeout=STOP_WAIT_S if not stopped else 1.0)
        for child in alive:
            with contextlib.suppress(psutil.Error):
                child.kill()
        stopped |= {child.pid for child in children}
    return stopped | _stop_resource_trackers(server)


def _stop_resource_trackers(server: int | None) -> set[int]:
    """Kill the resource trackers this process started, once their users are gone. From then on this
    process (about to exit) no longer speaks to its own tracker: a semaphore it lets go meanwhile (a
    Dask nanny closing) would otherwise relaunch it."""
    import psutil
    from multiprocessing import resource_tracker

    tracker = resource_tracker._resource_tracker
    tracker._send = lambda *args, **kwargs: None
    tracker.ensure_running = lambda: None
    trackers = [p for p in psutil.Process().children(recursive=True) if p.pid != server and _is_resource_tracker(p)]
    for process in trackers:  # a tracker ignores SIGINT and SIGTERM
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(trackers, timeout=1.0)
    return {process.pid for process in trackers}


def _is_resource_tracker(process) -> bool:
    try:
        return any("resource_tracker" in part for part in process.cmdline())
    except Exception:  # gone meanwhile
        return False


def cancel_flow_runs(pids: set[int], why: str) -> list[str]:
    """End Cancelled the recorded flow runs of these processes, and their unfinished task runs."""
    return _close_runs(lambda record: record["pid"] in pids, "Cancelled", why)


def close_orphans(url: str) -> list[str]:
    """End Crashed the recorded flow runs kept in the database the server at `url` serves, whose
    process has gone."""
    here = prefect_server.database()
    return _close_runs(lambda record: record.get("database") == here and not process_running(record["pid"],
                                                                                             record["started"]),
                       "Crashed", "its process ended without closing the run", server=url)


def _close_runs(chosen: Callable[[dict], bool], state: str, why: str, server: str | None = None) -> list[str]:
    closed = []
    for path in sorted(_runs_dir().glob("*.json")) if _runs_dir().is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not chosen(record):
            continue
        try:
            _set_state(server or record["server"], path.stem, state, why)
        except Exception:  # a server that does not answer now: the record waits for the next command
            continue
        closed.append(path.stem)
        with contextlib.suppress(OSError):
            path.unlink()
    return closed


def _set_state(server: str, flow_run_id: str, state: str, why: str) -> None:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.states import Cancelled, Crashed

    make = {"Cancelled": Cancelled, "Crashed": Crashed}[state]
    with SyncPrefectClient(server, httpx_settings={"timeout": 2.0}) as client:
        run = client.read_flow_run(flow_run_id)
        if run.state is None or run.state.is_final():
            return
        client.set_flow_run_state(flow_run_id, make(message=why), force=True)
        mine = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        for task_run in client.read_task_runs(flow_run_filter=mine):
            if task_run.state is None or not task_run.state.is_final():
                client.set_task_run_state(task_run.id, make(message=why), force=True)


def refused(exc: UserError):
    """The Prefect state of a flow or task run whose user input was refused: failed, named `Refused`,
    its message the sentence (no traceback in its log); its result raises `exc` again."""
    from prefect.states import Failed

    return Failed(name="Refused", message=str(exc), data=exc)


class ProjectBusy(UserError):
    """Another pipeline run, or a dvc command, holds the project's lock."""


@contextlib.contextmanager
def exclusive_run(repo_dir: Path, deadline: float = 0.0) -> Iterator[None]:
    """Hold the project's pipeline lock for one flow run. A second run started meanwhile in
    the same checkout waits until `deadline` (time.monotonic; by default not at all), then
    is refused with one sentence instead of interleaving its stages."""
    path = repo_dir / ".dvc" / "tmp" / "distill-pipeline.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:

        def holder() -> str:
            f.seek(0)
            return f.read().strip() or "another process"

        try:  # the lock is released by the OS if its holder dies
            until(deadline, lambda: fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB), BlockingIOError,
                   lambda: f"another pipeline run ({holder()}) holds the project's lock")
        except BlockingIOError:
            raise ProjectBusy(f"{path}: another pipeline run ({holder()}) is running in this checkout; "
                              "wait for it to finish") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}: {_command()}, since {time.strftime('%H:%M:%S')}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def project_busy(repo_dir: Path) -> str | None:
    """Who holds the project's pipeline lock (as exclusive_run words it), or None when it is free:
    a look that takes no lock for long, so a busy project is refused before any server starts."""
    try:
        with exclusive_run(Path(repo_dir)):
            return None
    except ProjectBusy as exc:
        return str(exc)


def _command() -> str:
    """This process's command line, short: what a waiting run says holds the project."""
    runtime = sys.modules.get("prefect.runtime")
    if runtime is not None and runtime.flow_run.name:  # a deployment's run: its process is Prefect's engine
        return f"flow run {runtime.flow_run.name}"
    words = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else ["python"]
    return " ".join(words)[:120]


def until(deadline: float, attempt: Callable, busy: type[Exception], why: Callable[[], str] = lambda: "busy"):
    """`attempt()` until it stops raising `busy`, every POLL_S seconds; past `deadline` (time.monotonic)
    the last `busy` is raised. While it waits, the run's log says `why()` every SAY_EVERY_S seconds."""
    started = said = time.monotonic()
    while True:
        try:
            return attempt()
        except busy:
            now = time.monotonic()
            if now >= deadline:
                raise
            if now - said >= SAY_EVERY_S:
                said = now
                _log().info("waiting %.0f s so far (at most %.0f s more): %s", now - started, deadline - now, why())
            time.sleep(POLL_S)


def _log() -> logging.Logger | logging.LoggerAdapter:
    """The flow run's log (the terminal and the Prefect UI) inside a run; this module's logger outside one."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)
