"""MLflow as a small service object. Run ids are always passed explicitly: the fluent "active run" is
thread-local, and Prefect runs tasks in worker threads."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergeflow.config import TrackingConfig

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
_INPUTS_LOCK = threading.Lock()


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    elif isinstance(value, list) and all(isinstance(v, Mapping) for v in value):
        for i, item in enumerate(value):
            _flatten(f"{prefix}.{i}", item, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)


class MlflowTracker:
    """Creates runs in one experiment and logs params, metrics, tags and artifacts by run id."""

    def __init__(self, config: TrackingConfig):
        from mlflow.tracking import MlflowClient

        self.config = config
        self.client = MlflowClient(tracking_uri=config.tracking_uri)
        experiment = self.client.get_experiment_by_name(config.experiment)
        if experiment is not None:
            self.experiment_id = experiment.experiment_id
        else:
            location = None
            if config.tracking_uri.startswith("sqlite:///"):  # no server: keep artifacts beside the database
                database = Path(config.tracking_uri.removeprefix("sqlite:///"))
                location = (database.absolute().parent / "mlartifacts").as_uri()
            self.experiment_id = self.client.create_experiment(config.experiment, artifact_location=location)

    def start_run(self, name: str, *, parent_run_id: str | None = None, tags: Mapping[str, str] | None = None) -> str:
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        return self.client.create_run(self.experiment_id, run_name=name, tags=all_tags).info.run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat: dict[str, str] = {}
        _flatten("", dict(params), flat)
        items = [Param(k, v[:6000]) for k, v in flat.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start:start + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for start in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[start:start + 500])

    def log_series(self, run_id: str, key: str, values: list[float]) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        items = [Metric(key, float(v), now, step) for step, v in enumerate(values)]
        for start in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[start:start + 500])

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_dict(self, run_id: str, value: Mapping[str, Any], artifact_file: str) -> None:
        self.client.log_dict(run_id, dict(value), artifact_file)

    def log_artifacts(self, run_id: str, local_dir: Path, artifact_path: str) -> None:
        self.client.log_artifacts(run_id, str(local_dir), artifact_path)

    def log_input_refs(self, run_id: str, refs: list[tuple[str, str, str, str]]) -> None:
        """Log stored objects as run inputs: (name, context such as base/expert/dataset, URI, sha256)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = []
        for name, context, uri, sha256 in refs:
            source = json.dumps({"uri": uri, "sha256": sha256})
            dataset = Dataset(name=name, digest=sha256[:32], source_type="s3" if uri.startswith("s3://") else "local",
                              source=source)
            inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)]))
        from mlflow.exceptions import MlflowException

        # MLflow inserts a shared dataset (the base, say) once per experiment; concurrent tasks race on that insert,
        # so serialise within the process and retry once across processes (the retry finds the row).
        with _INPUTS_LOCK:
            try:
                self.client.log_inputs(run_id, datasets=inputs)
            except MlflowException:
                self.client.log_inputs(run_id, datasets=inputs)

    def log_model(self, run_id: str, name: str, local_dir: Path, params: Mapping[str, Any],
                  metrics: Mapping[str, float], tags: Mapping[str, str]) -> str:
        """An MLflow logged model holding the merged safetensors files, its parameters and metrics."""
        flat: dict[str, str] = {}
        _flatten("", dict(params), flat)
        model = self.client.create_logged_model(self.experiment_id, name=name, source_run_id=run_id,
                                                params={k: v[:6000] for k, v in flat.items()}, tags=dict(tags),
                                                model_type="mergeflow-merged")
        try:
            self.client.log_model_artifacts(model.model_id, str(local_dir))
            for key, value in metrics.items():
                self.client.log_metric(run_id, key, float(value), model_id=model.model_id)
        except BaseException:
            self.client.finalize_logged_model(model.model_id, "FAILED")
            raise
        self.client.finalize_logged_model(model.model_id, "READY")
        return model.model_id

    def register(self, registered_name: str, model_id: str, run_id: str, score: float, *, metric: str,
                 margin: float, tags: dict[str, str] | None = None) -> dict[str, Any]:
        """Register a model version, alias it `candidate`, and promote it to `champion` only when its score beats
        the current champion's (its tag `metric`; a champion without one is replaced) by more than `margin`. The
        decision, both scores and `tags` are recorded as tags."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(registered_name)
        except MlflowException:
            self.client.create_registered_model(registered_name)
        location = self.client.get_logged_model(model_id).artifact_location  # not models:/ (resolved globally)
        version = self.client.create_model_version(registered_name, source=location, run_id=run_id,
                                                   model_id=model_id, tags={metric: repr(float(score)),
                                                                                 "mergeflow.model_id": model_id,
                                                                                 **(tags or {})})
        self.client.set_registered_model_alias(registered_name, "candidate", version.version)
        try:
            champion = self.client.get_model_version_by_alias(registered_name, "champion")
            champion_score = float(champion.tags.get(metric, "nan"))
        except MlflowException:
            champion, champion_score = None, None
        promote = champion is None or not champion_score == champion_score or score > champion_score + margin
        if promote:
            self.client.set_registered_model_alias(registered_name, "champion", version.version)
        decision = {
            "registered_model": registered_name, "version": str(version.version), "metric": metric,
            "candidate_score": score, "champion_version": str(champion.version) if champion else None,
            "champion_score": champion_score, "margin": margin, "promoted": promote,
        }
        for key, value in decision.items():
            self.client.set_model_version_tag(registered_name, version.version, f"gate.{key}", str(value))
        self.set_tags(run_id, {f"mergeflow.gate.{k}": str(v) for k, v in decision.items()})
        return decision

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def end_open_children(self, parent_run_id: str, status: str) -> list[str]:
        """End every still-running child run of `parent_run_id` (tasks cut short by a stop) with `status`."""
        runs = self.client.search_runs([self.experiment_id], filter_string=(
            f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'"), max_results=1000)
        for run in runs:
            self.client.set_terminated(run.info.run_id, status=status)
        return [run.info.run_id for run in runs]

    def run_url(self, run_id: str) -> str:
        return f"#/experiments/{self.experiment_id}/runs/{run_id}"
