"""The merge flow: fetch -> fine-tune missing experts -> statistics -> subspace -> sweep -> sparsify -> merge ->
evaluate -> record, as compiled into the run's plan (`mergeflow.plan`) and executed by `flows.plan_run`.

(No `from __future__ import annotations` here: Prefect builds the parameter model from the signature in a
process that loads this file by path, where string annotations cannot be resolved.)

Its one parameter is the pydantic `RunConfig` (a validated form in the Prefect UI). References (URI + sha256),
never tensors, pass between tasks.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, runtime
from prefect.exceptions import CancelledRun
from prefect.states import Cancelled

from mergeflow import stopping
from mergeflow.config import AUTO, RunConfig, load_run_config
from mergeflow.errors import ConfigError
from mergeflow.plan import compile_plan
from mergeflow.stages.refs import ModelRef
from flows.plan_run import PlanRun
from tasks.fetch import prepare_dataset
from tasks.finetune import fit_head
from tasks.runners import (configured_task_runner, describe_runner, release_pool_workers, stopping_workers,
                           task_runner_for)
from tasks.record import fail_tracking, is_stop, start_tracking


@flow(name="mergeflow-merge", log_prints=True)
def merge_flow(config: RunConfig) -> dict[str, Any]:
    """Merge one expert per task into multi-task models and score everything on held-out data."""
    return tracked_run(config, lambda parent: _run(config, parent))


def tracked_run(config: RunConfig, body: Callable[[str], Any]) -> Any:
    """Run a flow's `body(parent MLflow run id)` in its parent run, on the config's task runner. A stop (Ctrl-C,
    SIGTERM, a Prefect cancellation) asks every running task to stop at its next step, ends the MLflow runs
    KILLED, and ends the Prefect run Cancelled; any other exception ends them FAILED."""
    stopping.reinstall_handlers()  # a command-line run: SIGTERM asks for a stop, as Ctrl-C does
    run_id = str(runtime.flow_run.id)
    with configured_task_runner(config) as runner, stopping_workers(runner, run_id):
        parent = start_tracking(config, run_id, describe_runner(runner))
        try:
            return body(parent)
        except BaseException as error:
            if is_stop(error):  # tell the workers first (a served run's cancel arrives here), then end them
                stopping.request_stop(stopping.reason() or f"{type(error).__name__} received")
                release_pool_workers(runner)
            return _end_stopped_or_raise(config, parent, error)


def _end_stopped_or_raise(config: RunConfig, parent: str, error: BaseException) -> Any:
    if is_stop(error):
        stopping.request_stop(stopping.reason() or f"{type(error).__name__} received")
    fail_tracking(config.tracking, parent, error)
    if isinstance(error, (stopping.Stopped, CancelledRun)):
        return Cancelled(message=f"{error} (MLflow run {parent} ended KILLED)")
    raise error


def _run(config: RunConfig, parent: str) -> dict[str, Any]:
    return PlanRun(config, parent, compile_plan(config)).run()


def submit_task_inputs(config: RunConfig, base: ModelRef) -> tuple[dict[str, Any], dict[str, Any]]:
    """Futures of every task's dataset and frozen head (made by the model's family, or the task's own file)."""
    storage, device = config.storage, config.device
    datasets = {t.name: prepare_dataset.submit(t.name, config.data, storage, t.dataset, config.model.family)
                for t in config.tasks}
    heads = {t.name: fit_head.submit(t.name, base, datasets[t.name], config.evaluation, storage, device, t.head)
             for t in config.tasks}
    return datasets, heads


def describe_locations(config: RunConfig, summary: dict[str, Any]) -> str:
    tracking = config.tracking.tracking_uri
    if summary.get("skipped"):
        return (f"\nSkipped: no expert or setting changed since MLflow run {summary['same_as'].get('mlflow_run_id')} "
                f"(its merged models: {', '.join(summary['same_as'].get('merged', {}))}).")
    lines = ["", "Accuracy (%) on held-out test data; norm. avg = merged / expert accuracy per task:", "",
             summary["table"], "", "Merged models:"]
    lines += [f"  {label}: {ref['uri']}  (sha256 {ref['sha256'][:16]}...)" for label, ref in summary["merged"].items()]
    lines += ["", f"MLflow: run {summary['mlflow_run_id']} in experiment '{config.tracking.experiment}' ({tracking})"]
    if summary.get("registration"):
        r = summary["registration"]
        lines.append(f"  registered {r['registered_model']} v{r['version']} ({r['method']}, best {r['metric']} "
                     f"{r['candidate_score']:.4f}) as candidate"
                     + (", promoted to champion" if r["promoted"] else f"; champion stays v{r['champion_version']}"))
    if tracking.startswith("sqlite:"):
        lines.append(f"  UI: .venv/bin/mlflow ui --backend-store-uri {tracking} --host 127.0.0.1 --port 5000"
                     "  -> http://127.0.0.1:5000")
    else:
        lines.append(f"  UI: {tracking}")
    lines.append("Prefect: flow runs are in PREFECT_HOME=" + str(Path.cwd() / ".prefect"))
    lines.append("  UI: PREFECT_HOME=.prefect .venv/bin/prefect server start --host 127.0.0.1"
                 "  -> http://127.0.0.1:4200")
    return "\n".join(lines)


def run_config_file(path: str, only_swept: bool = False) -> dict[str, Any]:
    """Validate a YAML config, run the flow on it (`only_swept`: its swept and `auto` merges only), and print the results
    and where everything is."""
    config = load_run_config(path)
    if only_swept:
        swept = [spec for spec in config.merges if spec.sweep is not None or spec.method == AUTO]
        if not swept:
            raise ConfigError(f"{path}: no merge has a `sweep:` grid or method auto")
        config = config.model_copy(update={"merges": swept})
    summary = merge_flow.with_options(task_runner=task_runner_for(config))(config)
    print(describe_locations(config, summary))
    return summary
