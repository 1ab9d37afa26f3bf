"""Prefect flows. Without a configured Prefect API, runs use a temporary local server whose database lives in
the project's `.prefect/` folder (so `prefect server start` with the same PREFECT_HOME shows past runs)."""

import os
from pathlib import Path

if not os.environ.get("PREFECT_API_URL"):
    os.environ.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
