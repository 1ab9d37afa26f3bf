"""Prefect UI artifacts of a flow run: the accuracy table, a markdown summary with the bar chart, and links to
the MLflow run and the registered model."""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from mergeflow.config import TrackingConfig
from mergeflow.evaluate import normalized_accuracy
from mergeflow.plots import plot_accuracy_bars
from tasks import TIMEOUTS
from tasks.tracking import MlflowTracker


def artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


@task(name="publish-artifacts", timeout_seconds=TIMEOUTS["record"])
def publish_artifacts(run_name: str, rows: dict[str, dict[str, float]], tasks: list[str],
                      expert_acc: dict[str, float], table: str, tracking: TrackingConfig, parent_run_id: str,
                      registration: dict[str, Any] | None) -> None:
    key = artifact_key(run_name)
    records = []
    for model, acc in rows.items():
        normalized = normalized_accuracy({t: acc[t] for t in tasks}, expert_acc)
        records.append({"model": model, **{t: round(100 * acc[t], 1) for t in tasks},
                        "avg": round(100 * sum(acc[t] for t in tasks) / len(tasks), 1),
                        "norm. avg": round(100 * sum(normalized.values()) / len(tasks), 1)})
    create_table_artifact(records, key=f"{key}-accuracy",
                          description="test accuracy (%) per task; norm. avg = model / expert per task")
    merged = {m: a for m, a in rows.items() if m != "pretrained" and not m.startswith("expert:")}
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_accuracy_bars(merged or rows, tasks, Path(tmp) / "accuracy.png", f"{run_name}: merged models")
        picture = base64.b64encode(png.read_bytes()).decode()
    tracker = MlflowTracker(tracking)
    run_link = tracker.run_url(parent_run_id)
    lines = [f"# {run_name}", "", table, "", f"MLflow run `{parent_run_id}` in experiment "
             f"'{tracking.experiment}' ({tracking.tracking_uri})"]
    if registration:
        lines.append(f"Registered {registration['registered_model']} v{registration['version']} "
                     f"({registration['method']}) as candidate" + (", promoted to champion" if registration["promoted"]
                                                                   else ""))
    lines += ["", f"![accuracy per task](data:image/png;base64,{picture})"]
    create_markdown_artifact("\n".join(lines), key=f"{key}-summary", description="merge results")
    if tracking.tracking_uri.startswith(("http://", "https://")):
        base = tracking.tracking_uri.rstrip("/")
        create_link_artifact(f"{base}/{run_link}", link_text="MLflow run", key=f"{key}-mlflow-run")
        if registration:
            create_link_artifact(f"{base}/#/models/{registration['registered_model']}/versions/"
                                 f"{registration['version']}", link_text="registered model", key=f"{key}-mlflow-model")
