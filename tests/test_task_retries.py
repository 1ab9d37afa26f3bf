"""Tasks retry transient I/O failures and fail at once on bad input."""

from __future__ import annotations

import pytest
from prefect import flow, task

from mergeflow.errors import CheckpointError, ConfigError, TransientStorageError
from tasks import IO_RETRIES, is_transient


def test_transient_classification():
    assert is_transient(TransientStorageError("s3 timed out"))
    assert is_transient(ConnectionResetError("reset")) and is_transient(TimeoutError())
    assert is_transient(OSError("generic I/O error"))
    assert not is_transient(CheckpointError("x.safetensors", "truncated"))
    assert not is_transient(ConfigError("unknown method"))
    assert not is_transient(FileNotFoundError("gone")) and not is_transient(ValueError("bug"))


def _flaky_flow(error: Exception, failures: int):
    calls = []

    @task(**{**IO_RETRIES, "retry_delay_seconds": 0})
    def flaky() -> int:
        calls.append(1)
        if len(calls) <= failures:
            raise error
        return len(calls)

    @flow
    def run() -> int:
        return flaky()

    return run, calls


def test_transient_failure_is_retried_until_success(prefect_harness):
    run, calls = _flaky_flow(TransientStorageError("connection dropped"), failures=2)
    assert run() == 3 and len(calls) == 3


def test_bad_input_is_not_retried(prefect_harness):
    run, calls = _flaky_flow(CheckpointError("expert.safetensors", "2 NaN value(s)", tensor="w"), failures=5)
    with pytest.raises(CheckpointError, match="expert.safetensors"):
        run()
    assert len(calls) == 1


def test_cuda_out_of_memory_falls_back_to_the_cpu(capsys):
    import torch

    from tasks import on_device_or_cpu

    devices = []

    def run(device):
        devices.append(device)
        if device != "cpu":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return "merged"

    assert on_device_or_cpu(run, "cuda", "merge ties") == "merged" and devices == ["cuda", "cpu"]
    assert "running it again on the CPU" in capsys.readouterr().out

    def cpu_oom(device):
        raise torch.OutOfMemoryError("out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        on_device_or_cpu(cpu_oom, "cpu", "merge")
