"""Serve the pipeline flow on a cron schedule from this process, without a work pool.

    python -m pipelines.serve --cron "0 3 * * *"

Needs a running Prefect server: the project's (`make server`), or PREFECT_API_URL's;
a temporary server cannot schedule. Stop with Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
import sys

from pipelines import PROJECT_DIR
from pipelines.flow import pipeline
from pipelines.lifecycle import command


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cron", default="0 3 * * *", help="cron schedule (default: 03:00 every day, UTC)")
    parser.add_argument("--name", default="distill-pipeline-served", help="deployment name")
    parser.add_argument("--wait-for-lock", type=float, default=3600, metavar="SECONDS",
                        help="how long a run waits for a busy project before it ends Skipped (default 3600)")
    args = parser.parse_args(argv)
    # a schedule needs a server that stays; Ctrl-C and SIGTERM are the runner's own: it cancels
    # the runs it started and pauses the schedule
    with command(PROJECT_DIR, temporary_server=False, signals=False):
        signal.signal(signal.SIGINT, _interrupted)
        pipeline.serve(name=args.name, cron=args.cron, parameters={"wait_for_lock_s": args.wait_for_lock})
    if _interrupted.seen:  # the runner took the interrupt and returned: say so, and exit as interrupted
        print(f"interrupted: the schedule of distill-pipeline/{args.name} is paused and its runs were stopped",
              file=sys.stderr)
        raise SystemExit(130)


def _interrupted(signum, frame) -> None:
    _interrupted.seen = True
    raise KeyboardInterrupt


_interrupted.seen = False


if __name__ == "__main__":
    from stages.common import cli_main

    raise SystemExit(cli_main(main))
