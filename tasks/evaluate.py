"""Evaluate stage: per-task test accuracy of one encoder with the frozen heads; one child MLflow run each."""

from __future__ import annotations

from prefect import task

from mergeflow.stages import evaluate as evaluate_stage
from mergeflow.stages.refs import ObjectRef
from mergeflow.config import EvalConfig, StorageConfig, TrackingConfig
from tasks import IO_RETRIES, TIMEOUTS, on_device_or_cpu
from tasks.credentials import store_for, uses_storage
from tasks.tracking import MlflowTracker


@task(name="evaluate", task_run_name="evaluate-{label}", timeout_seconds=TIMEOUTS["evaluate"], **IO_RETRIES)
@uses_storage
def evaluate(label: str, weights: ObjectRef | None, base: ObjectRef,
             tasks: dict[str, tuple[ObjectRef, ObjectRef]], evaluation: EvalConfig,
             storage: StorageConfig, device: str, tracking: TrackingConfig | None = None,
             parent_run_id: str | None = None, split: str = "test", max_examples: int | None = None
             ) -> dict[str, float]:
    """Accuracy per task of `weights` (None: the pretrained encoder) on `split`, recorded as the child run
    `evaluate-<label>` (model and data as inputs, accuracy per task and average as metrics) when `tracking` is
    given."""
    store = store_for(storage)
    import time

    started = time.perf_counter()
    accuracy, reused = on_device_or_cpu(
        lambda on: evaluate_stage.evaluate_stored(weights, base, tasks, evaluation, store, on, split, max_examples),
        device, f"evaluate {label}")
    if tracking is not None:
        tracker = MlflowTracker(tracking)
        run_id = tracker.start_run(f"evaluate-{label}", parent_run_id=parent_run_id,
                                   tags={"mergeflow.stage": "evaluation", "mergeflow.model": label,
                                         "mergeflow.reused": str(reused).lower()})
        model = weights or base
        tracker.log_input_refs(run_id, [(f"{label}-model", "model", model.uri, model.sha256)] + [
            (f"{name}-{split}", "evaluation", dataset.uri, dataset.sha256) for name, (dataset, _) in tasks.items()])
        tracker.log_params(run_id, {"model": label, "model_uri": model.uri, "split": split,
                                    "evaluation": evaluation.model_dump()})
        tracker.log_metrics(run_id, {**{f"acc.{name}": value for name, value in accuracy.items()},
                                     "acc.avg": sum(accuracy.values()) / len(accuracy),
                                     "seconds": time.perf_counter() - started})
        tracker.end_run(run_id)
    return accuracy
