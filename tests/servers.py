"""Throw-away servers on loopback for end-to-end tests: PostgreSQL, an MLflow tracking server, and
`mlflow models serve` answering requests for one logged model.

Each listens on 127.0.0.1 only, on a free port, keeps everything in a temporary
directory, and is stopped by its own process id when the `with` block ends,
whether the test passed or not.

PostgreSQL refuses to run as root: under euid 0 its commands (initdb, pg_ctl) run as
the `postgres` system user that Debian's package creates, in a directory owned by it.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from distill.io import pid_alive
from pipelines.tools import BIN
from scratch import env as subprocess_env

PG_USER = "distill"


def free_port() -> int:
    """A TCP port nobody listens on at 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin_dir() -> Path | None:
    """The directory holding initdb and pg_ctl: from PATH, else the newest /usr/lib/postgresql/*/bin."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return Path(initdb).resolve().parent
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")
             if (Path(p).parent / "pg_ctl").is_file()]
    found.sort(key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)
    return found[-1] if found else None


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else "(no log)"


@contextmanager
def loopback_postgres(database: str = "mlflow", bin_dir: Path | None = None) -> Iterator[str]:
    """A fresh PostgreSQL cluster on 127.0.0.1 with one database; yields its SQLAlchemy URI.

    The URI names the psycopg2 driver (`postgresql+psycopg2://`): SQLAlchemy 2.1 reads a
    bare `postgresql://` as psycopg 3, which is not installed.

    Password authentication (scram-sha-256) for the user `distill`; fsync off (a test
    cluster). Stopped with `pg_ctl stop -m fast` on the way out, then killed by its
    postmaster pid if it still runs, and its directory removed.
    """
    import psycopg2

    bin_dir = bin_dir or postgres_bin_dir()
    if bin_dir is None:
        raise FileNotFoundError("postgresql server binaries (initdb, pg_ctl) not found")
    as_root = os.geteuid() == 0
    prefix: list[str] = []
    if as_root:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError("running as root, and there is no `postgres` user to run PostgreSQL as") from None
        prefix = [shutil.which("runuser") or "/usr/sbin/runuser", "-u", "postgres", "--"]
    # Short and outside pytest's root-only tmp directory: the postgres user must reach
    # it, and a Unix socket path is limited to about 100 characters.
    root = Path(tempfile.mkdtemp(prefix="distill-pg-"))
    data, log, pwfile = root / "data", root / "postgres.log", root / "pwfile"
    password = secrets.token_hex(16)
    pwfile.write_text(password + "\n")
    if as_root:
        for path in (root, pwfile):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    port = free_port()

    def run(*args: str, timeout: float = 120) -> None:
        result = subprocess.run([*prefix, *args], cwd=root, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({result.returncode}):\n"
                               f"{result.stdout}{result.stderr}\n{_tail(log)}")

    pid = None
    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", PG_USER, "--pwfile", str(pwfile),
            "-A", "scram-sha-256", "-E", "UTF8", "--no-locale", "--no-sync")
        options = (f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={shlex.quote(str(root))} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start")
        pid = int((data / "postmaster.pid").read_text().split()[0])
        conn = psycopg2.connect(host="127.0.0.1", port=port, user=PG_USER, password=password, dbname="postgres")
        try:
            conn.autocommit = True  # CREATE DATABASE refuses to run inside a transaction
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{database}"')
        finally:
            conn.close()
        yield f"postgresql+psycopg2://{PG_USER}:{password}@127.0.0.1:{port}/{database}"
    finally:
        try:
            if pid is not None or (data / "postmaster.pid").exists():
                run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "30", "stop", timeout=60)
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        finally:
            if pid is not None and pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
            shutil.rmtree(root, ignore_errors=True)


@contextmanager
def mlflow_server(backend_store_uri: str, artifacts: Path, log: Path, startup_timeout: float = 180
                  ) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 with a served artifact root at `artifacts`; yields its http:// URI.

    One worker; ready when /health answers. Runs in its own process group, which is
    sent SIGTERM on the way out, and SIGKILL for whatever is left of it 20 s later at most.
    """
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    artifacts.mkdir(parents=True, exist_ok=True)
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", backend_store_uri,
           "--serve-artifacts", "--artifacts-destination", str(artifacts),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = subprocess_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    # No background job runner (huey consumers for GenAI jobs): the pipeline uses none.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    with _server(cmd, env, artifacts.parent, log, f"{uri}/health", startup_timeout):
        yield uri


@contextmanager
def mlflow_model_server(model_uri: str, log: Path, tracking_uri: str, startup_timeout: float = 180
                        ) -> Iterator[str]:
    """`mlflow models serve` of `model_uri` (in this environment: --env-manager local) on 127.0.0.1;
    yields its http:// URI once /ping answers. Stopped as mlflow_server is: its process group
    gets SIGTERM, then SIGKILL for whatever is left."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = subprocess_env() | {"MLFLOW_TRACKING_URI": tracking_uri}
    with _server(cmd, env, log.parent, log, f"{uri}/ping", startup_timeout):
        yield uri


@contextmanager
def _server(cmd: list[str], env: dict, cwd: Path, log: Path, ready: str, timeout: float) -> Iterator[None]:
    """`cmd` in a process group of its own, its output in `log`, until the URL `ready` answers;
    the group is stopped on the way out (the server and its workers)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        what = " ".join(Path(c).name for c in itertools.takewhile(lambda c: not c.startswith("-"), cmd))
        _wait_for(proc, ready, what, log, timeout)  # "mlflow server", "mlflow models serve"
        yield
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group `proc` leads, SIGKILL to what outlives it 20 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def _wait_for(proc: subprocess.Popen, url: str, what: str, log: Path, timeout: float) -> None:
    """Until `url` answers; `what` (the command `proc` runs, logging to `log`) exiting or not
    answering within `timeout` seconds is an error that shows the end of its log."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not ready after {timeout:.0f} s:\n{_tail(log)}") from None
            time.sleep(0.5)
