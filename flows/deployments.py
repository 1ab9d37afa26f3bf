"""Deployments of the merge flow: `serve` (one process serves a scheduled deployment and runs what is
triggered, for a single machine) and `deploy` (registers a deployment on a work pool, run by workers).
Both take a run config file: its validated content becomes the deployment's `config` parameter, which the
Prefect UI shows as a form (method dropdowns, field descriptions) for custom runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergeflow.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = "flows/merge_flow.py:merge_flow"


def parameters_for(config: RunConfig) -> dict[str, Any]:
    return {"config": config.model_dump(mode="json", exclude_defaults=True)}


def _schedules(cron: str | None, timezone: str) -> list[Any]:
    from prefect.schedules import Cron

    return [Cron(cron, timezone=timezone)] if cron else []


def serve(config: RunConfig, *, name: str = "nightly", cron: str | None = "0 2 * * *", timezone: str = "UTC",
          limit: int | None = None) -> None:
    """Serve the deployment `mergeflow-merge/<name>` in this process until interrupted."""
    from flows.merge_flow import merge_flow
    from tasks.runners import task_runner_for

    merge_flow.with_options(task_runner=task_runner_for(config)).serve(
        name=name, schedules=_schedules(cron, timezone), parameters=parameters_for(config),
        description=f"merge flow on {config.name!r}", tags=["mergeflow"], limit=limit)


def deploy(config: RunConfig, *, name: str = "nightly", pool: str = "mergeflow-process", cron: str | None = "0 2 * * *",
           timezone: str = "UTC", source: str | Path = ROOT) -> str:
    """Register `mergeflow-merge/<name>` on work pool `pool` with code from `source` (this checkout by default,
    or a git URL); returns the deployment id. Start a worker with
    `prefect worker start --pool <pool> --type process`."""
    from prefect import flow as prefect_flow

    remote = prefect_flow.from_source(source=str(source), entrypoint=ENTRYPOINT)
    deployment_id = remote.deploy(name=name, work_pool_name=pool, schedules=_schedules(cron, timezone),
                                  parameters=parameters_for(config), description=f"merge flow on {config.name!r}",
                                  tags=["mergeflow"], build=False, push=False, print_next_steps=False)
    return str(deployment_id)
