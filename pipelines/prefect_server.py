"""Which Prefect server a command of this project talks to: the project's own, or a temporary one.

One server per project database. `make server` serves the project's database
(.prefect/prefect.db) at the project's address, http://127.0.0.1:$PREFECT_PORT/api
(4200 by default); `source .venv/bin/activate` points the `prefect` commands there.
A command that runs flows (distill run, sweep, serve; python -m pipelines.flow) calls
`connect()` before Prefect is imported:

- PREFECT_API_URL names another server (a team's): that one, as Prefect would.
- the project's server answers: that one, so the run shows in its UI.
- otherwise: a temporary server, started here on a database of its own
  (.prefect/temporary.db; while another command holds that, one for this process
  alone), in a session of its own, so that the terminal's Ctrl-C does not take it down
  before the interrupted run is recorded as ended. It stops when the command ends.

Prefect's own temporary server would run on the project's database, beside a
`make server` on the same file: the two lock each other ("database is locked", and
"Oops. Something went wrong" in the UI).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from distill.errors import UserError

STARTUP_TIMEOUT_S = 120.0  # a new database is migrated first: about 10 s on 2 busy cores
_temporary: dict = {}  # the server this process started: process, url, lock, database
_temporary_settings: list = []  # Prefect settings contexts entered by _use
_saved_env: list = []  # PREFECT_API_URL as it was before _use


def project_url() -> str:
    """The address `make server` serves the project's database on."""
    return f"http://127.0.0.1:{os.environ.get('PREFECT_PORT', '4200')}/api"


def answers(url: str, timeout: float = 1.0) -> bool:
    """Whether a Prefect server answers its health check at `url` (an .../api address)."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def connect(home: Path, temporary: bool = True) -> str:
    """Set PREFECT_API_URL for this process (and what it starts) to the server it should use, as the
    module docstring says; `home` is the project's PREFECT_HOME (.prefect). Returns the address.
    Without `temporary` (a schedule needs a server that stays), no server answering is a UserError."""
    url = configured_url()
    if url and url != project_url():
        return url  # the user's own server (or a test's): used as it is, as Prefect would
    if answers(project_url()):
        return _use(project_url())
    if not temporary:
        raise UserError(f"no Prefect server answers at {project_url()}; start the project's server "
                        "(make server) in another terminal, or set PREFECT_API_URL to yours")
    return _use(start_temporary(Path(home)))


def configured_url() -> str:
    """PREFECT_API_URL as Prefect sees it: the environment, the active profile (`prefect config set`,
    `prefect cloud login`), or a test harness's settings."""
    from prefect.settings import PREFECT_API_URL

    return (PREFECT_API_URL.value() or "").rstrip("/")


def _use(url: str) -> str:
    """Point this process (Prefect's settings), and what it starts (the environment), at `url`; the
    environment is put back by stop_temporary."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    _saved_env.append(os.environ.get("PREFECT_API_URL"))
    os.environ["PREFECT_API_URL"] = url
    _temporary_settings.append(temporary_settings(updates={PREFECT_API_URL: url}))
    _temporary_settings[-1].__enter__()
    return url


def start_temporary(home: Path) -> str:
    """A Prefect server on 127.0.0.1 on a free port, over .prefect/temporary.db (or this process's own
    database while another command holds that one), stopped when this process exits; its address."""
    if _temporary:
        return _temporary["url"]
    home.mkdir(parents=True, exist_ok=True)
    lock = open(home / "temporary.lock", "a")  # held while this process's server uses temporary.db
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        database = home / "temporary.db"
    except BlockingIOError:
        lock.close()
        lock, database = None, home / f"temporary-{os.getpid()}.db"
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_UI_ENABLED="0", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{database}", PREFECT__SERVER_EPHEMERAL="1")
    env.pop("PREFECT_API_URL", None)
    with open(home / "temporary-server.log", "a") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app", "--host",
             "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"],
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # not in the terminal's process group: Ctrl-C does not reach it
            # the server holds the database's lock as long as it lives, and dies with this process
            pass_fds=[lock.fileno()] if lock is not None else [], preexec_fn=_die_with_parent)
    _temporary.update(process=process, url=url, lock=lock, database=database)
    atexit.register(stop_temporary)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not answers(url, timeout=0.5):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_temporary()
            raise UserError(f"the temporary Prefect server did not start (see {home / 'temporary-server.log'}); "
                            "start the project's server with make server and run again")
        time.sleep(0.2)
    return url


def database() -> str:
    """Which database the server in use keeps its runs in: "project" (.prefect/prefect.db),
    "temporary" (.prefect/temporary.db), this process's own, or a server elsewhere (its address)."""
    if _temporary:
        return "temporary" if _temporary["lock"] is not None else f"own-{os.getpid()}"
    url = configured_url()
    return "project" if url == project_url() else url


def temporary_pid() -> int | None:
    """The pid of the temporary server this process started, if any (it is not to be stopped with the rest)."""
    return _temporary["process"].pid if _temporary else None


def _die_with_parent() -> None:
    """In the server's process, before it starts (Linux): SIGTERM when the process that started it
    dies, however it dies (SIGKILL too), so no temporary server outlives its command."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop_temporary(quick: bool = False) -> None:
    """Stop the temporary server this process started (if any), and give back its database;
    `quick` (an interrupt): no waiting for Prefect's workers to send what they hold."""
    if _temporary and not quick:
        _drain_prefect()  # the run's last log lines and events, before the server they go to stops
    while _temporary_settings:
        with contextlib.suppress(Exception):
            _temporary_settings.pop().__exit__(None, None, None)
    while _saved_env:
        saved = _saved_env.pop()
        if saved is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = saved
    if not _temporary:
        return
    process, lock, database = _temporary["process"], _temporary["lock"], _temporary["database"]
    _temporary.clear()
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=1 if quick else 5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if lock is not None:
        lock.close()
    else:  # a database of this process alone: nobody will read it again
        for path in database.parent.glob(f"{database.name}*"):
            with contextlib.suppress(OSError):
                path.unlink()


def _drain_prefect() -> None:
    """Send what Prefect's log and event workers still hold (at most a few seconds)."""
    if "prefect.logging.handlers" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ACTIVATE_MARK = "# distill: the project's Prefect home and server"


def add_to_activate(script: Path, project: Path, port: str = "4200") -> bool:
    """Make `source .venv/bin/activate` point the `prefect` commands at the project: its home
    (.prefect) and its server's address (make server); once (False when it was there already)."""
    text = script.read_text()
    if ACTIVATE_MARK in text:
        return False
    script.write_text(text.rstrip("\n") + f"""

{ACTIVATE_MARK} (make server serves it; with none running, distill starts a temporary one)
export PREFECT_HOME="{project / '.prefect'}"
export PREFECT_API_URL="http://127.0.0.1:{port}/api" PREFECT_PORT={port}
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
""")
    return True


if __name__ == "__main__":  # python -m pipelines.prefect_server .venv/bin/activate  (make install runs it)
    add_to_activate(Path(sys.argv[1]), Path(__file__).resolve().parents[1], os.environ.get("PREFECT_PORT", "4200"))
