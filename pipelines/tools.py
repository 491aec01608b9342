"""The command-line tools the orchestration runs (dvc, git, mlflow, torchrun), their
output as it comes, and how to read what a failed stage said.

Tools are run by path from this interpreter's bin folder, and that folder is put first
on PATH for what they start themselves (DVC runs stage commands and queue workers
from PATH). On a terminal a stage runs on a pseudo-terminal of its own, so its progress
bars are drawn, and its output reaches the user's terminal as it is written.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from distill.errors import UserError

BIN = Path(sys.executable).parent


class StageFailed(RuntimeError):
    """A stage command failed for a reason that may pass on retry (a lock held, a server that did
    not answer): the only failure the pipeline flow retries."""


class StageCrashed(RuntimeError):
    """A stage command failed on a bug (its traceback is in the stage's output): not retried."""


def tool_env(**extra: str) -> dict[str, str]:
    """os.environ with BIN first on PATH, plus `extra`, for dvc / mlflow subprocesses."""
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra)


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    """`dvc args` in `root`; a failure is a UserError with DVC's last words."""
    result = subprocess.run([str(BIN / "dvc"), *args], cwd=root, capture_output=True, text=True, env=tool_env())
    if result.returncode:
        raise UserError(f"dvc {' '.join(args)} failed: {(result.stderr or result.stdout).strip()[-500:]}")
    return result


def stage_error(lines: Iterable[str]) -> str | None:
    """The one-sentence error a stage printed ("... error: <sentence>"), from a dvc command's output lines."""
    return next((line.split("error: ", 1)[1].strip() for line in lines if "error: " in line), None)


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # colour and cursor codes: not for a log line
# The read ends of the outputs run_streaming is passing on. An interrupt closes them first: a
# stopping stage that still writes (its last lines) must not block on a reader that has stopped.
STREAMS: set[int] = set()


def run_streaming(cmd: list[str], cwd: str | Path, env: dict[str, str], on_line: Callable[[str], object],
                  terminal: bool = False) -> tuple[int, list[str]]:
    """Run `cmd`, calling `on_line` with each line of its output (stdout and stderr); its exit
    status and the lines. With `terminal`, the command writes to a pseudo-terminal (its progress
    bars show) and everything it writes is passed on to this process's stderr as it comes;
    `on_line` then gets each line as it last stood (a bar's final state, without escape codes)."""
    if not terminal:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        STREAMS.add(proc.stdout.fileno())
        try:
            for line in proc.stdout:
                lines.append(line.rstrip())
                on_line(lines[-1])
        finally:
            STREAMS.discard(proc.stdout.fileno())
        return proc.wait(), lines
    import pty

    leader, follower = pty.openpty()
    proc, lines, pending = None, [], b""
    STREAMS.add(leader)
    try:
        _same_size_as_this_terminal(follower)
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
        os.close(follower)
        follower = None
        while chunk := _read(leader):
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            *complete, pending = (pending + chunk).split(b"\n")
            for raw in complete:
                lines.append(_last_state(raw))
                on_line(lines[-1])
        if pending.strip():  # a last line without a newline
            lines.append(_last_state(pending))
            on_line(lines[-1])
        return proc.wait(), lines
    finally:
        STREAMS.discard(leader)
        for fd in (leader, follower):
            if fd is not None:
                os.close(fd)
        if proc is not None and proc.poll() is None:  # interrupted here: the command does not outlive us
            proc.terminate()
            proc.wait()


def _last_state(raw: bytes) -> str:
    """A terminal line as it last stood: a terminal ends lines with \\r\\n, and a bar redraws
    itself after a bare \\r; escape codes removed."""
    return ANSI.sub("", raw.decode(errors="replace").rstrip("\r").split("\r")[-1]).rstrip()


def _same_size_as_this_terminal(fd: int) -> None:
    """Give a new pseudo-terminal this terminal's size: one of 0 x 0 draws no progress bar."""
    import fcntl
    import shutil
    import struct
    import termios

    try:
        columns, rows = os.get_terminal_size(sys.stderr.fileno())  # where the output is shown
    except OSError:
        columns, rows = shutil.get_terminal_size()
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))


def _read(fd: int) -> bytes:
    """The next bytes a pseudo-terminal holds; b"" once the command has closed it."""
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: every writer has gone
        return b""
