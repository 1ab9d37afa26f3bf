"""Data hygiene before the flow's choices: validation examples that also appear in a task's training split, found by
content digest (`mergeflow.hygiene`) and reported in the flow's log, on the MLflow parent run and as a Prefect
artifact before any point is scored."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from mergeflow.config import StorageConfig, TrackingConfig
from mergeflow.hygiene import overlap_warning
from mergeflow.stages import data as data_stage
from mergeflow.stages.refs import ObjectRef
from tasks import IO_RETRIES, TIMEOUTS
from tasks.credentials import store_for, uses_storage
from tasks.tracking import MlflowTracker


@task(name="check-overlap", timeout_seconds=TIMEOUTS["record"], **IO_RETRIES)
@uses_storage
def check_overlap(base: ObjectRef, tasks: dict[str, tuple[ObjectRef, ObjectRef]], storage: StorageConfig,
                  tracking: TrackingConfig, parent_run_id: str) -> dict[str, dict[str, int]]:
    """Per task {"validation": examples, "in_train": of them also in the train split}; logged as parameters
    `validation_overlap.<task>` ("k/n"), and, where any overlaps, a warning line, the parent run's tag
    `mergeflow.validation_overlap` and the Prefect artifact `validation-overlap`."""
    store = store_for(storage)
    found = {name: data_stage.validation_overlap(name, dataset, base, store) for name, (dataset, _) in tasks.items()}
    tracker = MlflowTracker(tracking)
    tracker.log_params(parent_run_id, {f"validation_overlap.{name}": f"{o['in_train']}/{o['validation']}"
                                       for name, o in found.items()})
    warning = overlap_warning(found)
    if warning:
        get_run_logger().warning(warning)
        tracker.set_tags(parent_run_id, {"mergeflow.validation_overlap": ",".join(
            name for name, o in found.items() if o["in_train"])})
        create_markdown_artifact(f"### Validation overlaps training\n\n{warning}\n", key="validation-overlap",
                                 description="validation examples that also appear in a task's training split")
    return found
