"""MLflow as a small service object. Run ids are always passed explicitly: the fluent "active run" is
thread-local, and Prefect runs tasks in worker threads.

A tracking server that does not answer (refused, reset, timed out, 429/502/503/504: killed, restarting, overloaded)
is waited for: every call through `MlflowTracker.client` is retried with capped backoff for up to
`MERGEFLOW_MLFLOW_WAIT` seconds (default 300), then fails with one line (`TrackingUnavailable`). MLflow's own HTTP
retries are off by default (`MLFLOW_HTTP_REQUEST_MAX_RETRIES=0` unless set), so that this loop alone decides the
wait, and a create whose answer was lost (a run, a logged model, a model version) is looked up by a request tag
before it is sent again: a retry never duplicates it. A flow's parent run records the process that runs it; the
next run of the same config closes the runs of a process that died (SIGKILL, out of memory) or whose Prefect
flow run ended without closing them, and marks such a flow run Crashed."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from mergeflow import env
from mergeflow.config import TrackingConfig
from mergeflow.errors import MergeflowError
from tasks import progress
from tasks.runners import abandoned, process_identity

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the patient loop below retries, and bounds the wait
_INPUTS_LOCK = threading.Lock()
T = TypeVar("T")

WAIT_ENV = "MERGEFLOW_MLFLOW_WAIT"
DEFAULT_WAIT_S = 300.0
BACKOFF_CAP_S = 5.0
WAIT_AFTER_GIVING_UP_S = 10.0  # once a call gave up, the next ones (the failure's own records) wait this long
REQUEST_TAG = "mergeflow.request_id"
PROCESS_TAG = "mergeflow.process"  # the flow process: host|boot id|pid|start ticks (`process_identity`)
_GAVE_UP: dict[str, float] = {}  # tracking URI -> since when it has not answered, once a call gave up on it


class TrackingUnavailable(MergeflowError):
    """The MLflow tracking server did not answer within the wait."""


def wait_seconds() -> float:
    return env.seconds(WAIT_ENV, DEFAULT_WAIT_S)


def unreachable(error: BaseException) -> str | None:
    """A short reason when `error` says the server did not answer (worth waiting for), None otherwise."""
    import requests

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                                requests.exceptions.RetryError, ConnectionError, TimeoutError)):
            text = str(current)
            for marker, reason in (("refused", "connection refused"), ("timed out", "timed out"),
                                   ("reset", "connection reset"), ("aborted", "connection aborted"),
                                   ("RemoteDisconnected", "connection closed"), ("too many", "server error")):
                if marker in text:
                    return reason
            return type(current).__name__
        status = getattr(current, "get_http_status_code", None)
        if callable(status) and status() in (429, 502, 503, 504):
            return f"HTTP {status()}"
        current = current.__cause__ or current.__context__
    return None


def patient_call(uri: str, what: str, call: Callable[[], T], recover: Callable[[], T | None] | None = None) -> T:
    """`call()`, retried while the server at `uri` does not answer, for up to `wait_seconds()`. Before each retry,
    `recover()` (when given) looks for what a lost answer may have created; a result other than None is returned."""
    started, delay, wait = None, 0.5, 0.0
    while True:
        try:
            result = call()
        except Exception as error:
            reason = unreachable(error)
            if reason is None:
                raise
            now = time.monotonic()
            if started is None:
                started = now
                wait = min(wait_seconds(), WAIT_AFTER_GIVING_UP_S) if uri in _GAVE_UP else wait_seconds()
                print(f"mergeflow: MLflow at {uri} does not answer ({what}: {reason}); waiting up to {wait:.0f} s",
                      flush=True)
            if now - started >= wait:
                since = _GAVE_UP[uri] = min(started, _GAVE_UP.get(uri, started))
                raise TrackingUnavailable(
                    f"MLflow at {uri} did not answer for {now - since:.0f} s ({what}: {reason}); start it again "
                    f"(`mergeflow stack up`) and rerun: finished stages are reused (wait longer with {WAIT_ENV}="
                    "<seconds>)") from None
            time.sleep(min(delay, max(0.0, started + wait - now)))
            delay = min(2 * delay, BACKOFF_CAP_S)
            if recover is not None:
                found = patient_call(uri, f"{what} (lookup)", recover)
                if found is not None:
                    result = found
                    break
            continue
        break
    _GAVE_UP.pop(uri, None)
    if started is not None:
        print(f"mergeflow: MLflow at {uri} answers again ({what}, after {time.monotonic() - started:.0f} s)",
              flush=True)
    return result


class PatientClient:
    """An `MlflowClient` whose every method waits out an unreachable server (`patient_call`)."""

    def __init__(self, client: Any, uri: str) -> None:
        self.raw, self.uri = client, uri

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.raw, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            return patient_call(self.uri, name, lambda: attribute(*args, **kwargs))

        return call

    def create(self, method: str, recover: Callable[[], Any], /, *args: Any, **kwargs: Any) -> Any:
        """A create that a lost answer must not repeat: `recover()` finds it if the server made it."""
        return patient_call(self.uri, method, lambda: getattr(self.raw, method)(*args, **kwargs), recover)


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    elif isinstance(value, list) and all(isinstance(v, Mapping) for v in value):
        for i, item in enumerate(value):
            _flatten(f"{prefix}.{i}", item, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class MlflowTracker:
    """Creates runs in one experiment and logs params, metrics, tags and artifacts by run id."""

    def __init__(self, config: TrackingConfig):
        from mlflow.tracking import MlflowClient

        self.config = config
        self.client = PatientClient(MlflowClient(tracking_uri=config.tracking_uri), config.tracking_uri)
        experiment = self.client.get_experiment_by_name(config.experiment)
        if experiment is not None:
            self.experiment_id = experiment.experiment_id
        else:
            location = None
            if config.tracking_uri.startswith("sqlite:///"):  # no server: keep artifacts beside the database
                database = Path(config.tracking_uri.removeprefix("sqlite:///"))
                location = (database.absolute().parent / "mlartifacts").as_uri()

            def existing() -> str | None:
                found = self.client.raw.get_experiment_by_name(config.experiment)
                return found.experiment_id if found is not None else None

            self.experiment_id = self.client.create("create_experiment", existing, config.experiment,
                                                    artifact_location=location)

    def start_run(self, name: str, *, parent_run_id: str | None = None, tags: Mapping[str, str] | None = None) -> str:
        """A new run (a child of `parent_run_id`). A flow's own run (tag mergeflow.stage=flow) records this process,
        after closing the runs of `name` that a dead process left open (`close_abandoned`)."""
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        elif all_tags.get("mergeflow.stage") == "flow":
            self.close_abandoned(name)
            identity = process_identity(os.getpid())
            if identity:
                all_tags[PROCESS_TAG] = identity
        token = all_tags[REQUEST_TAG] = uuid.uuid4().hex

        def existing() -> Any:
            runs = self.client.raw.search_runs([self.experiment_id], f"tags.`{REQUEST_TAG}` = '{token}'")
            return runs[0] if runs else None

        run = self.client.create("create_run", existing, self.experiment_id, run_name=name, tags=all_tags)
        return run.info.run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat: dict[str, str] = {}
        _flatten("", dict(params), flat)
        items = [Param(k, v[:6000]) for k, v in flat.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start:start + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)  # one timestamp: a batch sent again is recognised as the same metrics
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for start in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[start:start + 500])

    def log_series(self, run_id: str, key: str, values: list[float]) -> None:
        from mlflow.entities import Metric

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
        from mlflow.exceptions import MlflowException

        inputs = []
        for name, context, uri, sha256 in refs:
            source = json.dumps({"uri": uri, "sha256": sha256})
            dataset = Dataset(name=name, digest=sha256[:32], source_type="s3" if uri.startswith("s3://") else "local",
                              source=source)
            inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)]))

        # MLflow inserts a shared dataset (the base, say) once per experiment; concurrent tasks race on that insert,
        # so serialise within the process and retry once across processes (the retry finds the row).
        def log() -> None:
            with _INPUTS_LOCK:
                try:
                    self.client.raw.log_inputs(run_id, datasets=inputs)
                except MlflowException as error:
                    if unreachable(error):
                        raise
                    self.client.raw.log_inputs(run_id, datasets=inputs)

        patient_call(self.client.uri, "log_inputs", log)

    def log_model(self, run_id: str, name: str, local_dir: Path, params: Mapping[str, Any],
                  metrics: Mapping[str, float], tags: Mapping[str, str]) -> str:
        """An MLflow logged model holding the merged safetensors files, its parameters and metrics (the upload
        prints a line as it starts and one as it ends: `progress.upload`)."""
        flat: dict[str, str] = {}
        _flatten("", dict(params), flat)
        token = uuid.uuid4().hex

        def existing() -> Any:
            found = self.client.raw.search_logged_models([self.experiment_id],
                                                         filter_string=f"tags.`{REQUEST_TAG}` = '{token}'")
            return found[0] if found else None

        model = self.client.create("create_logged_model", existing, self.experiment_id, name=name,
                                   source_run_id=run_id, params={k: v[:6000] for k, v in flat.items()},
                                   tags={**tags, REQUEST_TAG: token}, model_type="mergeflow-merged")
        try:
            with progress.upload(f"merged model {name!r}", local_dir, model.artifact_location):  # GBs: minutes
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
        except MlflowException as error:
            if unreachable(error):
                raise
            self.client.create("create_registered_model", lambda: self._registered(registered_name),
                               registered_name)
        location = self.client.get_logged_model(model_id).artifact_location  # not models:/ (resolved globally)
        token = uuid.uuid4().hex

        def existing() -> Any:
            found = self.client.raw.search_model_versions(
                f"name = {_quoted(registered_name)} and tags.`{REQUEST_TAG}` = '{token}'")
            return found[0] if found else None

        version = self.client.create("create_model_version", existing, registered_name, source=location,
                                     run_id=run_id, model_id=model_id,
                                     tags={metric: repr(float(score)), "mergeflow.model_id": model_id,
                                           REQUEST_TAG: token, **(tags or {})})
        self.client.set_registered_model_alias(registered_name, "candidate", version.version)
        try:
            champion = self.client.get_model_version_by_alias(registered_name, "champion")
            champion_score = float(champion.tags.get(metric, "nan"))
        except MlflowException as error:
            if unreachable(error):
                raise
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

    def _registered(self, name: str) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.raw.get_registered_model(name)
        except MlflowException as error:
            if unreachable(error):
                raise
            return None

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def end_open_children(self, parent_run_id: str, status: str) -> list[str]:
        """End every still-running child run of `parent_run_id` (tasks cut short by a stop) with `status`."""
        runs = self.client.search_runs([self.experiment_id], filter_string=(
            f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'"), max_results=1000)
        for run in runs:
            self.client.set_terminated(run.info.run_id, status=status)
            self._fail_pending_models(run.info.run_id)
        return [run.info.run_id for run in runs]

    def close_abandoned(self, name: str) -> list[str]:
        """End FAILED the open runs nobody will close: flow runs named `name` whose process is gone (same machine)
        or whose Prefect flow run has ended, with their open children, and any open child run whose parent has
        ended (a failed run ends its parent only). Unfinished logged models of these runs are marked FAILED, and a
        Prefect flow run still Running for a dead process is marked Crashed. Returns the closed run ids."""
        runs = self.client.search_runs([self.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                       max_results=1000)
        parents: dict[str, str] = {}
        closed: list[str] = []
        for run in runs:
            tags = run.data.tags
            parent = tags.get("mlflow.parentRunId")
            if parent is None and tags.get("mergeflow.stage") == "flow" and tags.get("mlflow.runName") == name:
                why = abandoned(tags)
            elif parent is not None:
                if parent not in parents:
                    parents[parent] = self.client.get_run(parent).info.status
                why = None if parents[parent] == "RUNNING" else f"its parent run {parent} ended {parents[parent]}"
            else:
                continue
            if why is None or run.info.run_id in closed:
                continue
            children = self.end_open_children(run.info.run_id, status="FAILED")
            self._fail_pending_models(run.info.run_id)
            self.set_tags(run.info.run_id, {"mergeflow.error": f"abandoned: {why}"})
            self.end_run(run.info.run_id, status="FAILED")
            print(f"mergeflow: closed the open MLflow run {run.info.run_id} ({run.info.run_name}): {why}", flush=True)
            closed += [run.info.run_id, *children]
        return closed

    def _fail_pending_models(self, run_id: str) -> None:
        """Mark FAILED the logged models `run_id` started and never finished (an upload cut short)."""
        models = self.client.search_logged_models([self.experiment_id],
                                                  filter_string=f"source_run_id = '{run_id}'")
        for model in models:
            if str(getattr(model.status, "name", model.status)).upper().endswith("PENDING"):
                self.client.finalize_logged_model(model.model_id, "FAILED")

    def run_url(self, run_id: str) -> str:
        return f"#/experiments/{self.experiment_id}/runs/{run_id}"
