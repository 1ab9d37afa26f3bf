"""Evaluate stage: per-task test accuracy of one encoder with the frozen heads."""

from __future__ import annotations

from prefect import task

from mergeflow import stages
from mergeflow.config import EvalConfig, StorageConfig
from tasks import IO_RETRIES


@task(name="evaluate", task_run_name="evaluate-{label}", **IO_RETRIES)
def evaluate(label: str, weights: stages.ObjectRef | None, base: stages.ObjectRef,
             tasks: dict[str, tuple[stages.ObjectRef, stages.ObjectRef]], evaluation: EvalConfig,
             storage: StorageConfig, device: str) -> dict[str, float]:
    return stages.evaluate_model(weights, base, tasks, evaluation, storage, device)
