"""Prefect flows. Without a configured Prefect API, runs use a temporary local server whose database lives in
the project's `.prefect/` folder (so `prefect server start` with the same PREFECT_HOME shows past runs)."""

import os
from pathlib import Path

if not os.environ.get("PREFECT_API_URL"):
    os.environ.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


class _ThreadTimeoutNotice:
    """Prefect warns on every sync task with a timeout that runs in a worker thread (the limit takes effect once
    the blocking call returns). Mergeflow's stage limits are meant for that: keep the notice out of run logs."""

    def filter(self, record) -> bool:
        return "running in a worker thread" not in record.getMessage()


def _quiet_thread_timeout_notice() -> None:
    import logging

    for name in ("prefect.task_runs", "prefect"):
        logging.getLogger(name).addFilter(_ThreadTimeoutNotice())


_quiet_thread_timeout_notice()
