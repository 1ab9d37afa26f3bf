"""Sweep stage: each grid point is its own task (validation scores only, cached by input digests + method +
parameters, a child MLflow run each); the selection task picks the point, records it on the parent run with a
plot (MLflow artifact, Prefect artifacts) and returns the parameters to merge."""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from mergeflow.stages import sweep as sweep_stage
from mergeflow.stages.refs import ObjectRef
from mergeflow.config import EvalConfig, MergeSpec, StorageConfig, TrackingConfig, TuningConfig
from mergeflow.sweep import choose, plot_sweep, score_point
from tasks import IO_RETRIES, TIMEOUTS, on_device_or_cpu
from tasks.credentials import store_for, uses_storage
from tasks.tracking import MlflowTracker


@task(name="sweep-point", task_run_name="sweep-{label}-{index}", timeout_seconds=TIMEOUTS["evaluate"], **IO_RETRIES)
@uses_storage
def sweep_point(label: str, index: int, method: str, params: dict[str, Any], base: ObjectRef,
                experts: dict[str, ObjectRef], tasks: dict[str, tuple[ObjectRef, ObjectRef]],
                tuning: TuningConfig, evaluation: EvalConfig, storage: StorageConfig, device: str,
                tracking: TrackingConfig, parent_run_id: str, subspaces: dict[str, ObjectRef] | None = None,
                state: ObjectRef | None = None, statistics: dict[str, ObjectRef] | None = None,
                tags: dict[str, str] | None = None, learn_on: str | None = None,
                resume_from: int = 0) -> dict[str, Any]:
    """{"accuracy": per task, "correct": each example's credit per task} (`mergeflow.stages.sweep.sweep_point`).
    `subspaces`, `state` and `statistics`: the stored factors, global pass (sparsify stage) and the experts'
    statistics the point's method reads; `tags`: extra tags of its MLflow run (a search's rung); `learn_on`: the
    split whose unlabeled inputs a learned method's objective reads; `resume_from`: the count of examples it may
    already be scored on (a search's earlier rung), whose credits it keeps."""
    store = store_for(storage)
    result, reused = on_device_or_cpu(
        lambda on: sweep_stage.sweep_point(method, params, base, experts, tasks, tuning, evaluation, store, on,
                                           subspaces, state, statistics, learn_on, resume_from), device,
        f"sweep point {label}-{index}")
    accuracy = result["accuracy"]
    tracker = MlflowTracker(tracking)
    run_id = tracker.start_run(f"sweep-{label}-{index}", parent_run_id=parent_run_id,
                               tags={"mergeflow.stage": "sweep", "mergeflow.method": method,
                                     "mergeflow.reused": str(reused).lower(), **(tags or {})})
    tracker.log_params(run_id, {"method": method, **{f"param.{k}": v for k, v in params.items()},
                                "split": "validation", "max_examples": tuning.max_examples,
                                **({"learn_on": learn_on} if learn_on else {}),
                                **({"resume_from": resume_from} if resume_from else {})})
    tracker.log_metrics(run_id, {**{f"val_acc.{t}": v for t, v in accuracy.items()},
                                 "val_acc.avg": sum(accuracy.values()) / len(accuracy)})
    tracker.end_run(run_id)
    return result


@task(name="select-point", task_run_name="select-{label}", timeout_seconds=TIMEOUTS["record"], **IO_RETRIES)
def select_point(label: str, spec: MergeSpec, points: list[dict[str, Any]], accuracies: list[dict[str, float]],
                 expert_accuracy: dict[str, float], tuning: TuningConfig, tracking: TrackingConfig,
                 parent_run_id: str) -> dict[str, Any]:
    """The chosen parameters (the rule on validation scores; ties to the smaller coefficients)."""
    swept = list(spec.grid())
    scores = [score_point(p, a, expert_accuracy, tuning.rule, tuning.floor) for p, a in zip(points, accuracies)]
    best = choose(scores, swept)
    tracker = MlflowTracker(tracking)
    tracker.log_params(parent_run_id, {f"tune.{label}.rule": tuning.rule, f"tune.{label}.points": len(points),
                                       **{f"tune.{label}.{k}": best.params[k] for k in swept}})
    tracker.log_metrics(parent_run_id, {f"tune.{label}.val_norm_acc.avg": best.norm_avg,
                                        f"tune.{label}.val_acc.avg": best.avg})
    rows = [{**{k: s.params[k] for k in swept}, **{f"val {t}": round(100 * v, 1) for t, v in s.accuracy.items()},
             "val avg": round(100 * s.avg, 1), "val norm. avg": round(100 * s.norm_avg, 1),
             "chosen": "yes" if s is best else ""} for s in scores]
    tracker.log_dict(parent_run_id, {"rule": tuning.rule, "floor": tuning.floor, "swept": swept, "points": rows,
                                     "chosen": {k: best.params[k] for k in swept}}, f"sweeps/{label}.json")
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_sweep(scores, swept, Path(tmp) / f"{label}.png", f"{label}: validation accuracy")
        tracker.log_artifacts(parent_run_id, Path(tmp), "sweeps")
        picture = base64.b64encode(png.read_bytes()).decode()
    key = label.lower().replace("_", "-")
    create_table_artifact(rows, key=f"sweep-{key}", description=f"{label}: validation scores per grid point")
    chosen = ", ".join(f"{k}={best.params[k]}" for k in swept)
    create_markdown_artifact(
        f"### {label}\nChosen on validation ({tuning.rule}): **{chosen}** (val norm. avg {100 * best.norm_avg:.1f}%, "
        f"MLflow run {tracker.run_url(parent_run_id)})\n\n![validation accuracy](data:image/png;base64,{picture})\n",
        key=f"sweep-{key}-plot", description=f"{label}: validation accuracy against the coefficients")
    return best.params
