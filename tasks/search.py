"""The `auto` search's records: an MLflow child run that holds every candidate's sweep-point run (one per rung it
reached), and, once the search is done, its leaderboard (MLflow JSON + plot, Prefect table + markdown) and the
chosen method and parameters on the flow's parent run."""

from __future__ import annotations

import base64
import json
import tempfile
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from mergeflow.config import SearchConfig, TrackingConfig, TuningConfig
from mergeflow.search import SearchResult, plot_search
from tasks import IO_RETRIES, TIMEOUTS
from tasks.tracking import MlflowTracker


@task(name="open-search", task_run_name="open-search-{label}", timeout_seconds=TIMEOUTS["record"], **IO_RETRIES)
def open_search(label: str, search: SearchConfig, candidates: int, rungs: list[int], tuning: TuningConfig,
                tracking: TrackingConfig, parent_run_id: str) -> str:
    """Start the search's MLflow child run (its candidates' runs nest under it); returns its id."""
    tracker = MlflowTracker(tracking)
    run_id = tracker.start_run(f"search-{label}", parent_run_id=parent_run_id, tags={"mergeflow.stage": "search"})
    tracker.log_params(run_id, {"candidates": candidates, "rungs": json.dumps(rungs), "eta": search.eta,
                                "rule": tuning.rule, "methods": ",".join(search.methods or ["(all applicable)"]),
                                "max_evaluations": search.max_evaluations, "max_seconds": search.max_seconds,
                                "split": "validation"})
    return run_id


@task(name="record-search", task_run_name="record-search-{label}", timeout_seconds=TIMEOUTS["record"],
      **IO_RETRIES)
def record_search(label: str, result: SearchResult, tracking: TrackingConfig, parent_run_id: str,
                  search_run_id: str) -> dict[str, Any]:
    """Log the leaderboard and the choice; returns the chosen method and parameters."""
    tracker = MlflowTracker(tracking)
    winner = result.winner
    tracker.log_params(search_run_id, {"chosen.method": winner.method,
                                       **{f"chosen.{k}": v for k, v in winner.params.items()},
                                       "stopped": result.stopped or "no"})
    tracker.log_metrics(search_run_id, {"rungs_done": result.rungs_done, "examples_scored": result.examples_scored,
                                        "seconds": result.seconds, "val_norm_acc.avg": result.winner_score.norm_avg,
                                        "val_acc.avg": result.winner_score.avg})
    for rung, seconds in enumerate(result.timings):
        tracker.log_metrics(search_run_id, {"rung_seconds": seconds}, step=rung)
    rows = result.leaderboard()
    tracker.log_dict(search_run_id, {"winner": {"method": winner.method, "params": winner.params},
                                     "stopped": result.stopped, "examples_scored": result.examples_scored,
                                     "seconds": result.seconds, "rung_seconds": result.timings,
                                     "leaderboard": rows}, f"search/{label}.json")
    tracker.log_params(parent_run_id, {f"tune.{label}.method": winner.method,
                                       **{f"tune.{label}.{k}": v for k, v in winner.params.items()}})
    tracker.log_metrics(parent_run_id, {f"tune.{label}.val_norm_acc.avg": result.winner_score.norm_avg,
                                        f"tune.{label}.val_acc.avg": result.winner_score.avg})
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_search(result, Path(tmp) / f"{label}.png", f"{label}: successive halving on validation data")
        tracker.log_artifacts(search_run_id, Path(tmp), "search")
        picture = base64.b64encode(png.read_bytes()).decode()
    tracker.end_run(search_run_id)
    key = label.lower().replace("_", "-")
    create_table_artifact(rows, key=f"search-{key}", description=f"{label}: every candidate's validation score "
                          "(normalized, %) at each rung it reached")
    stop = f" Stopped early: {result.stopped}." if result.stopped else ""
    create_markdown_artifact(
        f"### {label}\nChosen on validation: **{winner.name}** (val norm. avg {100 * result.winner_score.norm_avg:.1f}%)"
        f" after {result.rungs_done} of {result.rungs_planned} rungs, {result.examples_scored} validation examples "
        f"per task scored, {result.seconds:.0f} s.{stop} MLflow run {tracker.run_url(search_run_id)}\n\n"
        f"![search](data:image/png;base64,{picture})\n", key=f"search-{key}-plot",
        description=f"{label}: the search's rungs")
    return {"method": winner.method, "params": winner.params}
