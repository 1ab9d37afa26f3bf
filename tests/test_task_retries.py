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


class _NoTracker:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: "run-id"


@pytest.mark.parametrize("stage", ["sparsify", "build_subspace", "sweep_point", "compute_statistics", "merge",
                                   "evaluate"])
def test_every_device_stage_falls_back_to_the_cpu_on_cuda_oom(stage, monkeypatch, tmp_path):
    """Sparsify, subspace, sweep points, statistics, merge and evaluation each run again on the CPU after a CUDA OOM
    (fine-tuning does not: the README says so)."""
    import torch

    import tasks.evaluate
    import tasks.merge
    import tasks.statistics
    import tasks.sweep
    from mergeflow.stages import evaluate as evaluate_stage, merge as merge_stage, sparsify as sparsify_stage
    from mergeflow.stages import statistics as statistics_stage, subspace as subspace_stage, sweep as sweep_stage
    from mergeflow.stages.refs import ObjectRef
    from mergeflow.config import EvalConfig, MergeSpec, StatisticsConfig, StorageConfig, TrackingConfig, TuningConfig

    module, library = {"sparsify": (sparsify_stage, "sparsify"), "sweep_point": (sweep_stage, "sweep_point"),
                       "build_subspace": (subspace_stage, "build_subspace"),
                       "compute_statistics": (statistics_stage, "compute_statistics"),
                       "merge": (merge_stage, "merge_experts"), "evaluate": (evaluate_stage, "evaluate_stored")}[stage]
    results = {"sparsify": {}, "sweep_point": ({"accuracy": {"a": 1.0}, "correct": {}}, False), "merge": ("ref", {}),
               "evaluate": ({"a": 1.0}, False)}
    devices: list[str] = []

    def stage_on(*args, **kwargs):
        devices.append(args[-1] if stage in ("sparsify", "compute_statistics", "build_subspace") else
                       args[8] if stage == "sweep_point" else args[6] if stage == "merge" else args[5])
        if devices[-1] != "cpu":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return results[stage]

    monkeypatch.setattr(module, library, stage_on)
    for task_module in (tasks.statistics, tasks.sweep, tasks.merge, tasks.evaluate):
        monkeypatch.setattr(task_module, "MlflowTracker", _NoTracker, raising=False)
    storage, ref = StorageConfig(root=str(tmp_path)), ObjectRef(uri=str(tmp_path / "x"), sha256="0" * 64)
    tracking = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/m.db")
    results["compute_statistics"] = (ref, {"reused": False, "examples": 1, "seconds": 0.0})
    results["sparsify"] = (ref, False)
    results["build_subspace"] = (ref, False, {"seconds": 0.0, "bytes": 1.0})
    spec = MergeSpec(method="ties")
    calls = {
        "sparsify": lambda: tasks.merge.sparsify.fn(spec, ref, {"a": ref}, storage, "cuda", tracking, "p"),
        "build_subspace": lambda: tasks.merge.build_subspace.fn("task", ref, {"a": ref}, storage, "cuda", tracking,
                                                                "p"),
        "sweep_point": lambda: tasks.sweep.sweep_point.fn("ties", 0, "ties", {}, ref, {"a": ref}, {"a": (ref, ref)},
                                                          TuningConfig(), EvalConfig(), storage, "cuda", tracking, "p"),
        "compute_statistics": lambda: tasks.statistics.compute_statistics.fn(
            "a", ref, ref, ref, ref, ("gram",), StatisticsConfig(), storage, "cuda", tracking, "p"),
        "merge": lambda: tasks.merge.merge.fn(spec, ref, {"a": ref}, str(tmp_path / "out"), storage, None, "cuda"),
        "evaluate": lambda: tasks.evaluate.evaluate.fn("m", ref, ref, {"a": (ref, ref)}, EvalConfig(), storage,
                                                       "cuda"),
    }
    calls[stage]()
    assert devices == ["cuda", "cpu"]
