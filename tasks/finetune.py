"""Fine-tune stage: fit each task's frozen head, then fine-tune (or reuse) its expert; one child MLflow run each."""

from __future__ import annotations

from prefect import task

from mergeflow.stages import data as data_stage, finetune as finetune_stage
from mergeflow.stages.refs import ObjectRef
from mergeflow.config import EvalConfig, FinetuneConfig, StorageConfig, TrackingConfig
from tasks import IO_RETRIES, TIMEOUTS
from tasks.credentials import store_for, uses_storage
from tasks.tracking import MlflowTracker


@task(name="fit-head", task_run_name="fit-head-{task_name}", timeout_seconds=TIMEOUTS["train"], **IO_RETRIES)
@uses_storage
def fit_head(task_name: str, base: ObjectRef, dataset: ObjectRef, evaluation: EvalConfig,
             storage: StorageConfig, device: str, head: str | None = None) -> ObjectRef:
    store = store_for(storage)
    return data_stage.fit_head(task_name, base, dataset, evaluation, store, device, head)


@task(name="finetune-expert", task_run_name="finetune-expert-{task_name}",
      timeout_seconds=TIMEOUTS["train"], **IO_RETRIES)
@uses_storage
def finetune_expert(task_name: str, base: ObjectRef, dataset: ObjectRef, head: ObjectRef,
                    settings: FinetuneConfig, storage: StorageConfig, device: str, tracking: TrackingConfig,
                    parent_run_id: str) -> ObjectRef:
    store = store_for(storage)
    expert, report = finetune_stage.finetune_expert(task_name, base, dataset, head, settings, store, device)
    tracker = MlflowTracker(tracking)
    run_id = tracker.start_run(f"expert-{task_name}", parent_run_id=parent_run_id,
                               tags={"mergeflow.stage": "finetune", "mergeflow.task": task_name,
                                     "mergeflow.reused": str(report.get("reused", False)).lower()})
    tracker.log_params(run_id, {"task": task_name, "finetune": settings.model_dump(), "base_uri": base.uri,
                                "base_sha256": base.sha256, "dataset_uri": dataset.uri,
                                "dataset_sha256": dataset.sha256, "head_sha256": head.sha256,
                                "expert_uri": expert.uri, "expert_sha256": expert.sha256})
    tracker.log_input_refs(run_id, [("base", "base", base.uri, base.sha256),
                                     (f"{task_name}-data", "training", dataset.uri, dataset.sha256),
                                     (f"{task_name}-head", "head", head.uri, head.sha256)])
    if report.get("losses"):
        tracker.log_series(run_id, "train_loss", report["losses"])
        tracker.log_metrics(run_id, {"train_seconds": report.get("seconds", 0.0)})
    tracker.end_run(run_id)
    return expert
