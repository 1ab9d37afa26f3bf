"""Deployments of the merge flow: `serve` (one process serves a scheduled deployment and runs what is
triggered, for a single machine) and `deploy` (registers a deployment on a work pool, run by workers).
Both take a run config file: its validated content becomes the deployment's `config` parameter, which the
Prefect UI shows as a form (method dropdowns, field descriptions) for custom runs.

Both declare what may run at once: by default one run of the deployment at a time, and a run that comes while one
is running (the nightly run and one triggered by hand) waits for it (`ENQUEUE`; `CANCEL_NEW` cancels it instead),
as prefect.yaml declares for `prefect deploy`. Runs that do overlap (other deployments, `mergeflow run`) are safe
on one store: each output is published once, and the champion gate decides one run at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergeflow.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = "flows/merge_flow.py:merge_flow"
CONCURRENCY_LIMIT = 1  # runs of one deployment at once
COLLISION_STRATEGY = "ENQUEUE"  # what a run beyond the limit does: ENQUEUE (waits) or CANCEL_NEW
COLLISION_STRATEGIES = ("ENQUEUE", "CANCEL_NEW")


def parameters_for(config: RunConfig) -> dict[str, Any]:
    return {"config": config.model_dump(mode="json", exclude_defaults=True)}


def _schedules(cron: str | None, timezone: str) -> list[Any]:
    from prefect.schedules import Cron

    return [Cron(cron, timezone=timezone)] if cron else []


def concurrency(limit: int | None = CONCURRENCY_LIMIT, collision_strategy: str = COLLISION_STRATEGY) -> Any:
    """Prefect's `ConcurrencyLimitConfig` for at most `limit` runs of the deployment at once (None or 0: no limit)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    if collision_strategy not in COLLISION_STRATEGIES:
        raise ValueError(f"collision strategy {collision_strategy!r}: expected "
                         f"{' or '.join(COLLISION_STRATEGIES)}")
    if not limit:
        return None
    return ConcurrencyLimitConfig(limit=limit, collision_strategy=ConcurrencyLimitStrategy(collision_strategy))


def deployment_options(config: RunConfig, *, cron: str | None = "0 2 * * *", timezone: str = "UTC",
                       concurrency_limit: int | None = CONCURRENCY_LIMIT,
                       collision_strategy: str = COLLISION_STRATEGY) -> dict[str, Any]:
    """What `serve` and `deploy` give the deployment: schedule, parameters, description, tags, concurrency."""
    return {"schedules": _schedules(cron, timezone), "parameters": parameters_for(config),
            "description": f"merge flow on {config.name!r}", "tags": ["mergeflow"],
            "concurrency_limit": concurrency(concurrency_limit, collision_strategy)}


def serve(config: RunConfig, *, name: str = "nightly", cron: str | None = "0 2 * * *", timezone: str = "UTC",
          limit: int | None = None, concurrency_limit: int | None = CONCURRENCY_LIMIT,
          collision_strategy: str = COLLISION_STRATEGY) -> None:
    """Serve the deployment `mergeflow-merge/<name>` in this process until interrupted (`limit`: flow runs this
    process runs at once; `concurrency_limit`: runs of the deployment at once, wherever they run)."""
    from flows.merge_flow import merge_flow
    from tasks.runners import task_runner_for

    options = deployment_options(config, cron=cron, timezone=timezone, concurrency_limit=concurrency_limit,
                                 collision_strategy=collision_strategy)
    merge_flow.with_options(task_runner=task_runner_for(config)).serve(
        name=name, global_limit=options.pop("concurrency_limit"), limit=limit, **options)


def deploy(config: RunConfig, *, name: str = "nightly", pool: str = "mergeflow-process", cron: str | None = "0 2 * * *",
           timezone: str = "UTC", source: str | Path = ROOT, concurrency_limit: int | None = CONCURRENCY_LIMIT,
           collision_strategy: str = COLLISION_STRATEGY) -> str:
    """Register `mergeflow-merge/<name>` on work pool `pool` with code from `source` (this checkout by default,
    or a git URL); returns the deployment id. Start a worker with
    `prefect worker start --pool <pool> --type process`."""
    from prefect import flow as prefect_flow

    remote = prefect_flow.from_source(source=str(source), entrypoint=ENTRYPOINT)
    deployment_id = remote.deploy(name=name, work_pool_name=pool, build=False, push=False, print_next_steps=False,
                                  **deployment_options(config, cron=cron, timezone=timezone,
                                                       concurrency_limit=concurrency_limit,
                                                       collision_strategy=collision_strategy))
    return str(deployment_id)
