"""Thin Prefect tasks around `mergeflow.stages`: retries for transient failures only, timeouts, MLflow records.

Bad input (`mergeflow.errors.InputError`) is never retried: it fails the task at once with its clear message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from prefect.tasks import exponential_backoff

from mergeflow.errors import InputError, TransientStorageError

T = TypeVar("T")
TRANSIENT = (TransientStorageError, ConnectionError, TimeoutError)


def is_transient(exc: BaseException | None) -> bool:
    """Network and storage hiccups are worth a retry; bad input, missing objects and our own bugs are not."""
    if exc is None or isinstance(exc, (InputError, FileNotFoundError, FileExistsError, PermissionError)):
        return False
    return isinstance(exc, TRANSIENT) or type(exc) is OSError


def retry_on_transient(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry only when the failure was transient."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as raised:  # noqa: BLE001 - the state's own exception is what we inspect
        exc = raised
    return is_transient(exc if isinstance(exc, BaseException) else None)


IO_RETRIES = dict(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5,
                  retry_condition_fn=retry_on_transient)

# Per-stage time limits (seconds): generous for CPU runs of the demo size, meant to stop a hung stage.
MINUTE = 60
TIMEOUTS = {"io": 30 * MINUTE, "train": 12 * 60 * MINUTE, "merge": 6 * 60 * MINUTE, "evaluate": 3 * 60 * MINUTE,
            "record": 30 * MINUTE}


def on_device_or_cpu(run: Callable[[str], T], device: str, what: str) -> T:
    """Run `run(device)`; on a CUDA out-of-memory error, free the cache and run it again on the CPU.
    (CUDA-only path: on a CPU device an OOM is a plain MemoryError and propagates.)"""
    import torch

    try:
        return run(device)
    except torch.OutOfMemoryError:
        if device == "cpu":
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(f"{what}: CUDA out of memory on {device!r}; running it again on the CPU")
        return run("cpu")
