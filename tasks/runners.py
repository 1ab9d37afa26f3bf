"""Task runners: the configured one (threads, a process pool, Dask), how a run names it, and how a stop reaches
the tasks it runs in other processes (`stopping_workers`)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect.task_runners import ThreadPoolTaskRunner

from mergeflow import stopping
from mergeflow.config import RunConfig

WORKER_GRACE_S = 3.0  # after a stop: how long pool workers may take to end their step before they are killed


def task_runner_for(config: RunConfig):
    """The configured task runner: threads (default), processes, or Dask (local cluster or an address)."""
    if config.task_runner == "processes":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=config.max_workers)
    if config.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if config.dask_address:
            return DaskTaskRunner(address=config.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": config.max_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    return ThreadPoolTaskRunner(max_workers=config.max_workers)


@contextmanager
def configured_task_runner(config: RunConfig) -> Iterator[Any]:
    """Make the config's task runner (`task_runner`, `max_workers`, `dask_address`) the one this flow run's tasks
    are submitted to. `mergeflow run` and `serve` start the flow with it already; a worker running a deployment
    calls the flow as decorated (threads, default size), so there the configured runner is started here and
    stands in for the engine's for the whole body."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or runner_matches(context.task_runner, config):
        yield context.task_runner if context else None
        return
    with task_runner_for(config) as runner:
        swapped = context.model_copy(update={"task_runner": runner})
        swapped._token = None  # a copy of the entered context: enter it afresh
        with swapped:
            yield runner


def runner_matches(runner: Any, config: RunConfig) -> bool:
    """Whether the active runner is the config's kind and size (a started Dask runner knows its address)."""
    kind = {"ThreadPoolTaskRunner": "threads", "ProcessPoolTaskRunner": "processes",
            "DaskTaskRunner": "dask"}.get(type(runner).__name__)
    if kind != config.task_runner:
        return False
    if kind == "dask":
        if config.dask_address:
            return getattr(runner, "address", None) == config.dask_address
        return (getattr(runner, "cluster_kwargs", None) or {}).get("n_workers") == config.max_workers
    return getattr(runner, "_max_workers", None) == config.max_workers


def describe_runner(runner: Any) -> str:
    """The task runner a run used, for its records: e.g. ProcessPoolTaskRunner(max_workers=2)."""
    if runner is None:
        return "none"
    size = getattr(runner, "_max_workers", None)
    address = getattr(runner, "address", None)
    detail = f"max_workers={size}" if size is not None else f"address={address}" if address else ""
    return f"{type(runner).__name__}({detail})"


@contextmanager
def stopping_workers(runner: Any, run_id: str) -> Iterator[None]:
    """While inside, a stop of this process reaches the tasks `runner` runs elsewhere: process-pool workers get
    `stopping.WORKER_STOP_SIGNAL` (each stops after its current step), Dask workers get the stop through the scheduler (scoped to
    `run_id`, so a long-lived cluster's next run is not stopped). Threads share the flag and need nothing."""
    if _pool_processes(runner) is not None:
        listener = _signal_pool
    elif type(runner).__name__ == "DaskTaskRunner":
        listener = _stop_dask_workers
    else:
        yield
        return
    with stopping.listening(lambda reason: listener(runner, reason, run_id)):
        yield


def release_pool_workers(runner: Any, grace: float = WORKER_GRACE_S) -> None:
    """After a stop: once the pool's tasks have ended (or `grace` seconds on), kill its workers: an idle
    worker's own exit can take many seconds on a busy machine, and the run should end promptly. Every stored object is published atomically: nothing half-written."""
    processes = _pool_processes(runner)
    if not processes:
        return
    pending = getattr(runner._executor, "_pending_work_items", {})
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and pending:
        time.sleep(0.1)
    for process in processes:
        if process.is_alive():
            process.kill()


def _pool_processes(runner: Any) -> list[Any] | None:
    """The worker processes of a started ProcessPoolTaskRunner (None for other runners)."""
    if type(runner).__name__ != "ProcessPoolTaskRunner":
        return None
    executor = getattr(runner, "_executor", None)
    return list((getattr(executor, "_processes", None) or {}).values())


def _signal_pool(runner: Any, _reason: str, _run_id: str) -> None:
    for process in _pool_processes(runner) or []:
        try:
            os.kill(process.pid, stopping.WORKER_STOP_SIGNAL)
        except (ProcessLookupError, TypeError):
            pass


def _stop_dask_workers(runner: Any, reason: str, run_id: str) -> None:
    # a local cluster torn down after a stop logs each closed worker connection at INFO with its traceback
    # (distributed.batched, "Batched Comm Closed"): expected then, and only noise after the user's Ctrl-C
    logging.getLogger("distributed.batched").setLevel(logging.WARNING)
    try:
        runner.client.run(stopping.request_stop, reason, run_id)
    except Exception as error:  # noqa: BLE001 - a cluster already gone has nothing left to stop
        print(f"mergeflow: could not pass the stop to the Dask workers: {error}", flush=True)


__all__ = ["configured_task_runner", "describe_runner", "release_pool_workers", "runner_matches",
           "stopping_workers", "task_runner_for"]
