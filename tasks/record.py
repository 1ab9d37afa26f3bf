"""Record stage: the parent MLflow run of a flow run, one child run per merged model, and the results table."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect import task

from mergeflow.stages import runs as runs_stage
from mergeflow.stages.refs import ObjectRef
from mergeflow.config import MergeSpec, RunConfig, StorageConfig, TrackingConfig
from mergeflow.evaluate import normalized_accuracy
from mergeflow.model_card import CARD, card_text
from mergeflow.stopping import Stopped
from mergeflow.storage import sha256_file
from tasks import IO_RETRIES, TIMEOUTS
from tasks.credentials import store_for, uses_storage
from tasks.lineage import MANIFEST_TAG
from tasks.tracking import MlflowTracker


def accuracy_metrics(acc: dict[str, float], expert_acc: dict[str, float] | None) -> dict[str, float]:
    metrics = {f"acc.{task}": value for task, value in acc.items()}
    metrics["acc.avg"] = sum(acc.values()) / len(acc)
    if expert_acc:
        normalized = normalized_accuracy(acc, expert_acc)
        metrics.update({f"norm_acc.{task}": value for task, value in normalized.items()})
        metrics["norm_acc.avg"] = sum(normalized.values()) / len(normalized)
    return metrics


@task(name="start-tracking", timeout_seconds=TIMEOUTS["record"], **IO_RETRIES)
def start_tracking(config: RunConfig, flow_run_id: str, task_runner: str = "") -> str:
    """The flow's parent MLflow run (the run's first MLflow call: its experiment is created here when new)."""
    from mlflow.exceptions import MlflowException

    try:
        tracker = MlflowTracker(config.tracking)
    except MlflowException as exc:  # a concurrent run created the experiment between lookup and creation: use it
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        tracker = MlflowTracker(config.tracking)
    run_id = tracker.start_run(config.name, tags={"prefect.flow_run_id": flow_run_id, "mergeflow.stage": "flow",
                                                  "mergeflow.task_runner": task_runner})
    tracker.log_params(run_id, config.model_dump(mode="json"))
    return run_id


@task(name="record-merge", task_run_name="record-merge-{label}", timeout_seconds=TIMEOUTS["record"], **IO_RETRIES)
@uses_storage
def record_merge(label: str, spec: MergeSpec, merged: ObjectRef, record: dict[str, Any],
                 acc: dict[str, float], expert_acc: dict[str, float], datasets: dict[str, ObjectRef],
                 storage: StorageConfig, tracking: TrackingConfig, parent_run_id: str,
                 validation_acc: dict[str, float] | None = None,
                 expert_validation_acc: dict[str, float] | None = None) -> dict[str, Any]:
    """A child run for one merge: its inputs (base, experts, evaluation data) with digests, parameters, metrics
    (test, and `validation.*` when validation scores are given), and the merged checkpoint as an MLflow logged
    model. Returns the merge's record, whose `selection` metrics (validation only) decide registration."""
    store = store_for(storage)
    tracker = MlflowTracker(tracking)
    run_id = tracker.start_run(f"merge-{label}", parent_run_id=parent_run_id,
                               tags={"mergeflow.stage": "merge", "mergeflow.method": spec.method,
                                     "mergeflow.model_uri": merged.uri, "mergeflow.model_sha256": merged.sha256})
    tracker.log_input_refs(run_id, [(i["name"], i["role"], i["uri"], i["sha256"]) for i in record["inputs"]] + [
        (f"{task}-data", "evaluation", ref.uri, ref.sha256) for task, ref in datasets.items()])
    params = {"method": spec.method, **{f"param.{k}": v for k, v in record["params"].items()},
              "output_uri": merged.uri, "output_sha256": merged.sha256}
    tracker.log_params(run_id, params)
    selection = accuracy_metrics(validation_acc, expert_validation_acc) if validation_acc else {}
    metrics = {**accuracy_metrics(acc, expert_acc), **{f"validation.{k}": v for k, v in selection.items()},
               "merge_seconds": record.get("seconds", 0.0)}
    scores = {"test": accuracy_metrics(acc, expert_acc), **({"validation": selection} if selection else {})}
    tracker.log_text(run_id, card_text(spec.method, record["params"], record["inputs"], record.get("files", {}),
                                       scores=scores), CARD)  # the output's card, with the scores measured
    model_id = None
    if tracking.log_merged_weights:
        directory = runs_stage.local_directory_of(merged, store)
        model_id = tracker.log_model(run_id, label, directory, params, metrics,
                                     {"mergeflow.uri": merged.uri, "mergeflow.sha256": merged.sha256,
                                      MANIFEST_TAG: sha256_file(directory / "mergeflow.json")})
    else:
        tracker.log_metrics(run_id, metrics)
    tracker.end_run(run_id)
    return {"label": label, "run_id": run_id, "model_id": model_id, "selection": selection,
            "test": {k: v for k, v in metrics.items() if k in ("acc.avg", "norm_acc.avg")}}


SELECTION_SPLIT = "validation"


GATE_LEASE = 120.0  # seconds a gate lock is held at most: a lock older than this was left by a dead run
GATE_WAIT = 600.0  # seconds a run waits for the gate before it fails (transient: the task retries)


@contextmanager
def gate_lock(client: Any, registered_model: str, *, lease: float = GATE_LEASE, wait: float = GATE_WAIT
              ) -> Iterator[None]:
    """Hold the champion gate of `registered_model` alone, across processes and machines: the lock is the
    registered model `<name>.gate-lock` in the same registry, which only one creator can create (the registry
    refuses a second with RESOURCE_ALREADY_EXISTS), deleted on release. Its tags name its owner and when its lease
    ends; a lock whose lease ended (its run died inside the gate) is broken. Without it, two runs finishing together
    both read the old champion and the last to set the alias wins, even when it is the worse one."""
    from mlflow.exceptions import MlflowException

    from mergeflow.errors import TransientStorageError

    name, token = f"{registered_model}.gate-lock", uuid.uuid4().hex
    deadline = time.monotonic() + wait
    while True:
        try:
            client.create_registered_model(name, tags={"mergeflow.lock_owner": token,
                                                       "mergeflow.lock_expires": f"{time.time() + lease:.3f}"},
                                           description=f"champion gate of {registered_model} (held while a run "
                                                       "decides; mergeflow deletes it)")
            break
        except MlflowException as exc:  # held (or released while the registry said so: RESOURCE_DOES_NOT_EXIST)
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        try:
            tags = client.get_registered_model(name).tags
            if tags.get("mergeflow.lock_owner") == token:  # ours: created by a try whose answer was lost
                break
            if float(tags.get("mergeflow.lock_expires", "0")) < time.time():  # its holder died inside the gate
                client.delete_registered_model(name)
                continue
        except MlflowException:  # released meanwhile
            continue
        if time.monotonic() > deadline:
            raise TransientStorageError(f"model registry: the champion gate of {registered_model!r} ({name}) stayed "
                                        f"held for {wait:.0f} s by another run")
        time.sleep(random.uniform(0.05, 0.3))
    try:
        yield
    finally:
        try:
            if client.get_registered_model(name).tags.get("mergeflow.lock_owner") == token:
                client.delete_registered_model(name)
        except MlflowException:  # broken as expired meanwhile: nothing of ours to release
            pass


@task(name="register-model", timeout_seconds=TIMEOUTS["record"], **IO_RETRIES)
def register_best(tracking: TrackingConfig, parent_run_id: str, logged: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Register the run's best merged model (by `promotion_metric` on validation data) as `candidate`, and promote
    it to `champion` when its validation score beats the champion's by more than the margin. Test scores are only
    recorded beside it (tags `test.*`); the version's tags `mergeflow.selection_split` and
    `mergeflow.selection_metric` say what decided."""
    metric = tracking.promotion_metric
    candidates = [m for m in logged if m["model_id"] and metric in m["selection"]]
    if not tracking.registered_model or not candidates:
        return None
    best = max(candidates, key=lambda m: m["selection"][metric])
    tracker = MlflowTracker(tracking)
    with gate_lock(tracker.client, tracking.registered_model):  # runs that finish together decide one at a time
        decision = tracker.register(tracking.registered_model, best["model_id"], best["run_id"],
                                    best["selection"][metric], metric=f"{SELECTION_SPLIT}.{metric}",
                                    margin=tracking.promotion_margin,
                                    tags={"mergeflow.selection_split": SELECTION_SPLIT,
                                          "mergeflow.selection_metric": metric,
                                          **{f"test.{k}": repr(float(v)) for k, v in best["test"].items()}})
    decision["method"] = best["label"]
    tracker.set_tags(parent_run_id, {"mergeflow.candidate": best["label"],
                                     "mergeflow.promoted": str(decision["promoted"]).lower()})
    return decision


@task(name="record-results", timeout_seconds=TIMEOUTS["record"], **IO_RETRIES)
def record_results(tracking: TrackingConfig, parent_run_id: str, rows: dict[str, dict[str, float]],
                   expert_acc: dict[str, float], table: str, summary: dict[str, Any]) -> None:
    tracker = MlflowTracker(tracking)
    for model, acc in rows.items():
        tracker.log_metrics(parent_run_id, {f"{model}.{k}": v for k, v in accuracy_metrics(acc, expert_acc).items()})
    tracker.log_text(parent_run_id, table + "\n", "results.md")
    tracker.log_dict(parent_run_id, summary, "summary.json")
    tracker.end_run(parent_run_id)


def fail_tracking(tracking: TrackingConfig, parent_run_id: str, error: BaseException) -> None:
    """End the flow's MLflow run after an exception: KILLED (with its unfinished child runs) when the run was
    stopped or cancelled, FAILED otherwise."""
    tracker = MlflowTracker(tracking)
    stopped = is_stop(error)
    key = "mergeflow.stopped" if stopped else "mergeflow.error"
    tracker.set_tags(parent_run_id, {key: f"{type(error).__name__}: {error}"[:5000]})
    if stopped:
        tracker.end_open_children(parent_run_id, status="KILLED")
    tracker.end_run(parent_run_id, status="KILLED" if stopped else "FAILED")


def is_stop(error: BaseException) -> bool:
    """A stop request (Ctrl-C, SIGTERM, a Prefect cancellation) rather than a failure of the run."""
    from prefect.exceptions import CancelledRun, TerminationSignal

    return isinstance(error, (Stopped, KeyboardInterrupt, TerminationSignal, CancelledRun))


@task(name="check-unchanged", timeout_seconds=TIMEOUTS["record"], **IO_RETRIES)
@uses_storage
def check_unchanged(name: str, digest: str, storage: StorageConfig, tracking: TrackingConfig,
                    parent_run_id: str) -> dict[str, Any] | None:
    """The last successful run's record when its inputs digest equals `digest` (the run can be skipped): then
    says so in the log, a Prefect artifact and the parent MLflow run, and finishes that run."""
    store = store_for(storage)
    from prefect.artifacts import create_markdown_artifact

    last = runs_stage.last_success(name, store)
    if not last or last.get("inputs_digest") != digest:
        return None
    message = (f"Nothing changed since the last successful run of {name!r} (flow run {last.get('flow_run_id')}, "
               f"MLflow run {last.get('mlflow_run_id')}): same experts and config; merges skipped.")
    print(message)
    create_markdown_artifact(f"## {name}: skipped\n\n{message}\n", key=f"{name.lower().replace('_', '-')}-skipped",
                             description="nightly run skipped: no expert changed")
    tracker = MlflowTracker(tracking)
    tracker.set_tags(parent_run_id, {"mergeflow.skipped": "true",
                                     "mergeflow.same_as_run": str(last.get("mlflow_run_id"))})
    tracker.end_run(parent_run_id)
    return last


@task(name="mark-success", timeout_seconds=TIMEOUTS["record"], **IO_RETRIES)
@uses_storage
def mark_success(name: str, record: dict[str, Any], storage: StorageConfig) -> None:
    store = store_for(storage)
    runs_stage.record_success(name, store, record)
