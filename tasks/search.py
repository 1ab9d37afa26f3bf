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
from mergeflow.plots import save_figure
from mergeflow.search import Entry, SearchResult
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
                                "fidelity": search.fidelity, "split": "validation"})
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
                          "(normalized, %) and fidelity (the step counts it ran) at each rung it reached")
    stop = f" Stopped early: {result.stopped}." if result.stopped else ""
    create_markdown_artifact(
        f"### {label}\nChosen on validation: **{winner.name}** (val norm. avg {100 * result.winner_score.norm_avg:.1f}%)"
        f" after {result.rungs_done} of {result.rungs_planned} rungs, {result.examples_scored} validation examples "
        f"per task scored, {result.seconds:.0f} s.{stop} MLflow run {tracker.run_url(search_run_id)}\n\n"
        f"![search](data:image/png;base64,{picture})\n", key=f"search-{key}-plot",
        description=f"{label}: the search's rungs")
    return {"method": winner.method, "params": winner.params}


def plot_search(result: SearchResult, path: Path, title: str) -> Path:
    """Normalized validation accuracy of every candidate at each rung it reached (lines join a candidate's rungs;
    one colour per method; the winner in black; a hollow marker: scored with fewer steps than its own)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_candidate: dict[str, list[Entry]] = {}
    for e in result.entries:
        by_candidate.setdefault(e.candidate.name, []).append(e)
    methods = list(dict.fromkeys(e.candidate.method for e in result.entries))
    colours = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(methods)}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, path_entries in by_candidate.items():
        winner = name == result.winner.name
        colour = "black" if winner else colours[path_entries[0].candidate.method]
        xs, ys = [e.rung for e in path_entries], [100 * e.score.norm_avg for e in path_entries]
        ax.plot(xs, ys, linewidth=2.5 if winner else 0.8, color=colour, alpha=1.0 if winner else 0.7)
        for e, x, y in zip(path_entries, xs, ys):
            ax.plot([x], [y], marker="o", markersize=3, color=colour, markerfacecolor="none" if e.reduced else colour)
    for m in methods:
        ax.plot([], [], color=colours[m], label=m)
    ax.plot([], [], color="black", linewidth=2.5, label=f"chosen: {result.winner.name}")
    ax.plot([], [], marker="o", color="grey", markerfacecolor="none", linestyle="none", label="fewer steps")
    sizes = sorted({(e.rung, e.examples) for e in result.entries})
    ax.set_xticks([r for r, _ in sizes], [f"rung {r}\n{n}/task" for r, n in sizes])
    ax.set_ylabel("validation norm. accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)

