"""Statistics stage: per-expert Grams / Fisher for the data-aware methods; one child MLflow run each."""

from __future__ import annotations

from prefect import task

from mergeflow.stages import statistics as statistics_stage
from mergeflow.stages.refs import ObjectRef
from mergeflow.config import StatisticsConfig, StorageConfig, TrackingConfig
from tasks import IO_RETRIES, TIMEOUTS, on_device_or_cpu
from tasks.credentials import store_for, uses_storage
from tasks.tracking import MlflowTracker


@task(name="statistics", task_run_name="statistics-{task_name}", timeout_seconds=TIMEOUTS["train"], **IO_RETRIES)
@uses_storage
def compute_statistics(task_name: str, base: ObjectRef, expert: ObjectRef, dataset: ObjectRef,
                       head: ObjectRef, kinds: tuple[str, ...], settings: StatisticsConfig,
                       storage: StorageConfig, device: str, tracking: TrackingConfig,
                       parent_run_id: str, share: float = 1.0) -> ObjectRef:
    """`share` < 1: on that share of the examples (an `auto` search's early rungs)."""
    store = store_for(storage)
    ref, report = on_device_or_cpu(
        lambda on: statistics_stage.compute_statistics(task_name, base, expert, dataset, head, kinds, settings, store,
                                                       on, share=share),
        device, f"statistics {task_name}")
    tracker = MlflowTracker(tracking)
    name = statistics_stage.node_id(task_name, share).replace(":", "-")  # "statistics-<task>@0.1", as in Prefect
    run_id = tracker.start_run(name, parent_run_id=parent_run_id,
                               tags={"mergeflow.stage": "statistics", "mergeflow.task": task_name,
                                     "mergeflow.reused": str(report["reused"]).lower()})
    tracker.log_input_refs(run_id, [(f"{task_name}-expert", "expert", expert.uri, expert.sha256),
                                     (f"{task_name}-data", settings.split, dataset.uri, dataset.sha256)])
    tracker.log_params(run_id, {"task": task_name, "kinds": ",".join(kinds), "statistics": settings.model_dump(),
                                "share": share,
                                "statistics_uri": ref.uri, "statistics_sha256": ref.sha256})
    if not report["reused"]:
        tracker.log_metrics(run_id, {"examples": report["examples"], "seconds": report["seconds"]})
    tracker.end_run(run_id)
    return ref
