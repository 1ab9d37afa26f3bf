"""The task of a stage that has none of its own: its library `run` (`mergeflow.stages.stage.Stage`) over a context of
its inputs' outputs, with the retries, time limit, progress lines and an MLflow child run every stage gets. A new
stage needs no task here; a stage that records more in MLflow keeps a task of its own (`tasks/merge.py`, ...)."""

from __future__ import annotations

import time
from typing import Any

from prefect import task

from mergeflow.config import RunConfig
from mergeflow.stages.refs import ObjectRef
from mergeflow.stages.stage import Context, Node
from tasks import IO_RETRIES, TIMEOUTS, on_device_or_cpu
from tasks.credentials import stage_scope, store_for
from tasks.tracking import MlflowTracker


@task(name="stage", task_run_name="{node.id}", timeout_seconds=TIMEOUTS["merge"], **IO_RETRIES)
def run_stage(node: Node, config: RunConfig, outputs: dict[str, Any], parent_run_id: str) -> Any:
    """Run one plan node by its stage's `run` (`outputs`: the outputs of the nodes it reads, by id); an MLflow child
    run named after the node records its kind, its seconds and the reference it returned."""
    with stage_scope(node.kind, node.id):
        store = store_for(config.storage)
        started = time.perf_counter()
        out = on_device_or_cpu(lambda on: node.stage.run(node, Context(config, store, on, None, outputs)),
                               config.device, node.id)
        tracker = MlflowTracker(config.tracking)
        run_id = tracker.start_run(node.id.replace(":", "-"), parent_run_id=parent_run_id,
                                   tags={"mergeflow.stage": node.kind})
        if isinstance(out, ObjectRef):
            tracker.log_params(run_id, {"output_uri": out.uri, "output_sha256": out.sha256})
        tracker.log_metrics(run_id, {"seconds": round(time.perf_counter() - started, 3)})
        tracker.end_run(run_id)
    return out
