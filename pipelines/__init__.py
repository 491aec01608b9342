"""Prefect flows that run the DVC pipeline; no ML logic lives here.

Importing this package sets project-local Prefect defaults before Prefect is
imported: PREFECT_HOME in the repository's .prefect/ (git-ignored), and a
generous start-up timeout for the temporary server Prefect starts when no
PREFECT_API_URL is set (its first start on a new PREFECT_HOME runs migrations).
A running server is used whenever PREFECT_API_URL points at it.
"""

import os
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]

os.environ.setdefault("PREFECT_HOME", str(PROJECT_DIR / ".prefect"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network to send it to
os.environ.setdefault("DO_NOT_TRACK", "1")  # nor the client's telemetry (and no notice about it on the terminal)
