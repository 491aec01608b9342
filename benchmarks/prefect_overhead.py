"""Benchmark: the cost of Prefect on top of DVC when every stage is cached.

In a scratch copy of the project (committed params.yaml), after one full run, it
times a fully cached `dvc repro` and a fully cached pipeline flow run
(`python -m pipelines.flow`), the flow both with Prefect's temporary server (no
PREFECT_API_URL) and against a running `prefect server` on 127.0.0.1. Each is a
fresh process, as a user or a worker starts it; the median of --repeats runs is
reported, with the ratios measured in this one run. It also counts Prefect server
processes left behind by the flow runs (there should be none).

    python benchmarks/prefect_overhead.py [--repeats 3] [--out benchmarks/results/prefect_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.tools import BIN  # noqa: E402
from tests.scratch import PROJECT_DIR, env, make_scratch_project  # noqa: E402


def timed(cmd: list[str], cwd: Path, environ: dict) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=environ, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def median_time(cmd: list[str], cwd: Path, environ: dict, repeats: int) -> dict:
    times = [timed(cmd, cwd, environ) for _ in range(repeats)]
    return {"median_s": statistics.median(times), "runs_s": times}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(environ: dict) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(1)
    stop(proc)
    raise RuntimeError("prefect server did not start within 180 s")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def prefect_processes(home: str) -> int:
    """Processes still running with this PREFECT_HOME (temporary servers left behind)."""
    count = 0
    for p in psutil.process_iter(["pid"]):
        try:
            if p.pid != os.getpid() and p.environ().get("PREFECT_HOME") == home:
                count += 1
        except (psutil.Error, OSError):
            pass
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/prefect_overhead.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        project = make_scratch_project(Path(tmp) / "project")
        home = str(Path(tmp) / "prefect-home")
        base = env() | {"PREFECT_HOME": home, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        base.pop("PREFECT_API_URL", None)
        flow = [str(BIN / "python"), "-m", "pipelines.flow"]
        print("first, full run ...", flush=True)
        subprocess.run(flow, cwd=project, env=base, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        results = {"dvc_repro": median_time([str(BIN / "dvc"), "repro"], project, base, args.repeats),
                   "flow_temporary_server": median_time(flow, project, base, args.repeats)}
        results["left_behind_server_processes"] = prefect_processes(home)
        server, url = start_server(base)
        try:
            with_server = base | {"PREFECT_API_URL": url}
            timed(flow, project, with_server)  # warm-up: the server's first flow run registers the flow
            results["flow_running_server"] = median_time(flow, project, with_server, args.repeats)
        finally:
            stop(server)
    dvc = results["dvc_repro"]["median_s"]
    report = {
        "command": "python benchmarks/prefect_overhead.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **results,
        "ratio_flow_temporary_server_to_dvc_repro": results["flow_temporary_server"]["median_s"] / dvc,
        "ratio_flow_running_server_to_dvc_repro": results["flow_running_server"]["median_s"] / dvc,
    }
    out = PROJECT_DIR / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
