"""ATM stages: one fine-tuning task per task and round (a child MLflow run each, with its loss curve), and the
round's merge."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact

from mergeflow.stages import finetune as finetune_stage, merge as merge_stage
from mergeflow.stages.refs import ObjectRef, atm_merged_uri
from mergeflow.config import FinetuneConfig, MergeSpec, StorageConfig, TrackingConfig
from mergeflow.evaluate import normalized_accuracy
from tasks import IO_RETRIES, TIMEOUTS, on_device_or_cpu
from tasks.artifacts import artifact_key
from tasks.credentials import store_for, uses_storage
from tasks.tracking import MlflowTracker


@task(name="atm-finetune", task_run_name="atm-{round_index}-{task_name}", timeout_seconds=TIMEOUTS["train"],
      **IO_RETRIES)
@uses_storage
def atm_finetune(round_index: int, task_name: str, base: ObjectRef, start: ObjectRef | None,
                 dataset: ObjectRef, head: ObjectRef, settings: FinetuneConfig, split: str,
                 storage: StorageConfig, device: str, tracking: TrackingConfig, parent_run_id: str
                 ) -> ObjectRef:
    store = store_for(storage)
    ref, report = finetune_stage.atm_finetune(task_name, base, start, dataset, head, settings, split, store, device)
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
def atm_merge(round_index: int, spec: MergeSpec, base: ObjectRef, current: ObjectRef | None,
              round_experts: dict[str, ObjectRef], run: str, storage: StorageConfig,
              device: str) -> ObjectRef:
    """theta^(k) of run `run`, stored under a location keyed by the rule, theta^(k-1) and the round's experts."""
    store = store_for(storage)
    out_uri = atm_merged_uri(store.root, run, round_index, spec.model_dump(), current or base, round_experts)
    return on_device_or_cpu(lambda on: merge_stage.atm_merge(spec, base, current, round_experts, out_uri, store, on),
                            device, f"ATM merge of round {round_index}")


@task(name="record-atm-round", task_run_name="record-atm-round-{round_index}", timeout_seconds=TIMEOUTS["record"],
      **IO_RETRIES)
def record_atm_round(round_index: int, model: ObjectRef, accuracy: dict[str, float],
                     expert_accuracy: dict[str, float], tracking: TrackingConfig, parent_run_id: str) -> None:
    """The round's test accuracy (per task, average, normalised average) and its model on the parent run."""
    normalized = normalized_accuracy(accuracy, expert_accuracy)
    tracker = MlflowTracker(tracking)
    tracker.log_metrics(parent_run_id, {**{f"atm.acc.{t}": v for t, v in accuracy.items()},
                                        "atm.acc.avg": sum(accuracy.values()) / len(accuracy),
                                        "atm.norm_acc.avg": sum(normalized.values()) / len(normalized)},
                        step=round_index)
    tracker.log_params(parent_run_id, {f"atm.round.{round_index}.uri": model.uri,
                                       f"atm.round.{round_index}.sha256": model.sha256})


@task(name="record-atm-table", timeout_seconds=TIMEOUTS["record"], **IO_RETRIES)
def record_atm_table(rows: dict[str, dict[str, float]], names: list[str], table: str, run_name: str,
                     tracking: TrackingConfig, parent_run_id: str) -> None:
    """The rounds' table as a Prefect table artifact and an MLflow text file; ends the parent run."""
    create_table_artifact([{"model": model, **{t: round(100 * a[t], 1) for t in names},
                            "avg": round(100 * sum(a.values()) / len(a), 1)} for model, a in rows.items()],
                          key=f"{artifact_key(run_name)}-atm-rounds", description="test accuracy (%) by ATM round")
    tracker = MlflowTracker(tracking)
    tracker.log_text(parent_run_id, table + "\n", "atm.md")
    tracker.end_run(parent_run_id)
