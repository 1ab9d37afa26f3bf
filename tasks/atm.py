"""ATM stages: one fine-tuning task per task and round (a child MLflow run each, with its loss curve), and the
round's merge."""

from __future__ import annotations

from prefect import task

from mergeflow import stages
from mergeflow.config import FinetuneConfig, MergeSpec, StorageConfig, TrackingConfig
from tasks import IO_RETRIES, TIMEOUTS, on_device_or_cpu
from tasks.credentials import uses_storage
from tasks.tracking import MlflowTracker


@task(name="atm-finetune", task_run_name="atm-{round_index}-{task_name}", timeout_seconds=TIMEOUTS["train"],
      **IO_RETRIES)
@uses_storage
def atm_finetune(round_index: int, task_name: str, base: stages.ObjectRef, start: stages.ObjectRef | None,
                 dataset: stages.ObjectRef, head: stages.ObjectRef, settings: FinetuneConfig, split: str,
                 storage: StorageConfig, device: str, tracking: TrackingConfig, parent_run_id: str
                 ) -> stages.ObjectRef:
    ref, report = stages.atm_finetune(task_name, base, start, dataset, head, settings, split, storage, device)
    tracker = MlflowTracker(tracking)
    run_id = tracker.start_run(f"atm-{round_index}-{task_name}", parent_run_id=parent_run_id,
                               tags={"mergeflow.stage": "atm-finetune", "mergeflow.task": task_name,
                                     "mergeflow.round": str(round_index),
                                     "mergeflow.reused": str(report["reused"]).lower()})
    start_ref = start or base
    tracker.log_input_refs(run_id, [("start", "start", start_ref.uri, start_ref.sha256),
                                     (f"{task_name}-{split}", split, dataset.uri, dataset.sha256)])
    tracker.log_params(run_id, {"task": task_name, "round": round_index, "split": split,
                                "finetune": settings.model_dump(), "output_uri": ref.uri,
                                "output_sha256": ref.sha256})
    if report.get("losses"):
        tracker.log_series(run_id, "train_loss", report["losses"])
    tracker.end_run(run_id)
    return ref


@task(name="atm-merge", task_run_name="atm-merge-{round_index}", timeout_seconds=TIMEOUTS["merge"], **IO_RETRIES)
@uses_storage
def atm_merge(round_index: int, spec: MergeSpec, base: stages.ObjectRef, current: stages.ObjectRef | None,
              round_experts: dict[str, stages.ObjectRef], out_uri: str, storage: StorageConfig,
              device: str) -> stages.ObjectRef:
    return on_device_or_cpu(lambda on: stages.atm_merge(spec, base, current, round_experts, out_uri, storage, on),
                            device, f"ATM merge of round {round_index}")
