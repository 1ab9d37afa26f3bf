"""Task runners: the configured one (threads, a process pool, Dask), how a run names it, and how a stop reaches
the tasks it runs in other processes (`stopping_workers`). Also the flow process itself: a Prefect client that
waits out a restarting server (`patient_prefect_client`), and the identity that tells whether a run's process is
still alive (`process_identity`, `abandoned`)."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect.task_runners import ThreadPoolTaskRunner

from mergeflow import stopping
from mergeflow.staging import start_ticks
from mergeflow.config import RunConfig

WORKER_GRACE_S = 3.0  # after a stop: how long pool workers may take to end their step before they are killed
# The Prefect client's retries inside a flow run. Prefect's default (5: backoff 2+4+8+16+32 s) gives up on a server
# that takes more than about a minute to come back, and the run fails on some task's bookkeeping; 7 waits ~4 min.
PREFECT_CLIENT_RETRIES = 7


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
    with patient_prefect_client():
        if context is None or runner_matches(context.task_runner, config):
            yield context.task_runner if context else None
            return
        with task_runner_for(config) as runner:
            swapped = context.model_copy(update={"task_runner": runner})
            swapped._token = None  # a copy of the entered context: enter it afresh
            with swapped:
                yield runner


@contextmanager
def patient_prefect_client(retries: int = PREFECT_CLIENT_RETRIES) -> Iterator[None]:
    """While inside (and in the task threads it starts), the Prefect client retries a server that went away
    `retries` times with exponential backoff (a restart of up to ~4 min is waited out), unless
    PREFECT_CLIENT_MAX_RETRIES is set explicitly."""
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    if os.environ.get("PREFECT_CLIENT_MAX_RETRIES") or PREFECT_CLIENT_MAX_RETRIES.value() >= retries:
        yield
        return
    with temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: retries}):
        yield


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


WORKER_TEARDOWN_LOGGERS = ("distributed.worker", "distributed.batched", "distributed.core", "distributed.comm")


def _stop_on_worker(reason: str, run_id: str) -> None:
    """On each Dask worker: pass the stop on, and silence what its teardown logs next (a heartbeat that meets the
    closing scheduler logs an ERROR with a traceback): expected after a stop, and only noise then."""
    for name in WORKER_TEARDOWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    stopping.request_stop(reason, run_id)


def _stop_dask_workers(runner: Any, reason: str, run_id: str) -> None:
    # a local cluster torn down after a stop logs each closed worker connection at INFO with its traceback
    # (distributed.batched, "Batched Comm Closed"): expected then, and only noise after the user's Ctrl-C
    logging.getLogger("distributed.batched").setLevel(logging.WARNING)
    try:
        runner.client.run(_stop_on_worker, reason, run_id)
    except Exception as error:  # noqa: BLE001 - a cluster already gone has nothing left to stop
        print(f"mergeflow: could not pass the stop to the Dask workers: {error}", flush=True)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_identity(pid: int) -> str | None:
    """host|boot id|pid|start ticks of a live process (Linux), None elsewhere: a reused PID never matches it."""
    ticks, boot = start_ticks(pid), _boot_id()
    return f"{socket.gethostname()}|{boot}|{pid}|{ticks}" if ticks and boot else None


def abandoned(tags: Mapping[str, str]) -> str | None:
    """Why the flow run behind an open MLflow run (its tags) will never close it, or None when it may still."""
    identity = tags.get("mergeflow.process", "")
    flow_run_id = tags.get("prefect.flow_run_id", "")
    parts = identity.split("|")
    if len(parts) == 4 and parts[:2] == [socket.gethostname(), _boot_id()] and parts[2].isdigit():
        pid = int(parts[2])
        if process_identity(pid) != identity:
            crashed = _crash_flow_run(flow_run_id, f"its process (pid {pid}) ended without reporting")
            return f"its process (pid {pid}) ended without closing it" + (
                f"; Prefect flow run {flow_run_id} marked Crashed" if crashed else "")
    state = _flow_run_state(flow_run_id)
    if state is not None and state.is_final():
        return f"its Prefect flow run {flow_run_id} ended {state.name} without closing it"
    return None


def _flow_run_state(flow_run_id: str) -> Any:
    """The Prefect flow run's state on the current API, None when unknown (no API, another server, a bad id)."""
    from prefect.settings import PREFECT_API_URL

    if not flow_run_id or not PREFECT_API_URL.value():  # no API configured: never start an ephemeral one here
        return None
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            return client.read_flow_run(uuid.UUID(flow_run_id)).state
    except Exception:  # noqa: BLE001 - unknown here: the run is left open
        return None


def _crash_flow_run(flow_run_id: str, message: str) -> bool:
    """Mark a flow run that is not final Crashed (its process is known dead); whether it was."""
    state = _flow_run_state(flow_run_id)
    if state is None or state.is_final():
        return False
    try:
        from prefect.client.orchestration import get_client
        from prefect.states import Crashed

        with get_client(sync_client=True) as client:
            client.set_flow_run_state(uuid.UUID(flow_run_id), Crashed(message=message), force=True)
        return True
    except Exception:  # noqa: BLE001 - best effort: the MLflow run is closed either way
        return False


__all__ = ["abandoned", "configured_task_runner", "describe_runner", "patient_prefect_client", "process_identity",
           "release_pool_workers", "runner_matches", "stopping_workers", "task_runner_for"]
