"""The merge flow: fetch -> fine-tune missing experts -> statistics -> subspace -> sweep -> sparsify -> merge ->
evaluate -> record.

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
from mergeflow.config import AUTO, MergeSpec, RunConfig, load_run_config
from mergeflow.errors import ConfigError
from mergeflow.evaluate import format_results_table
from mergeflow.plan import compile_plan, sparsifies
from mergeflow.stages import merge as merge_stage, statistics as statistics_stage, subspace as subspace_stage
from mergeflow.stages.refs import ModelRef, ObjectRef, run_inputs_digest
from flows.selection import score_on_validation, tune
from tasks.artifacts import publish_artifacts
from tasks.evaluate import evaluate
from tasks.fetch import fetch_expert, fetch_latest_expert, fetch_pretrained, prepare_dataset
from tasks.finetune import finetune_expert, fit_head
from tasks.hygiene import check_overlap
from tasks.merge import assemble_merge, build_subspace, merge, merge_part, sparsify
from tasks.progress import CLOCK
from tasks.runners import (configured_task_runner, describe_runner, release_pool_workers, stopping_workers,
                           task_runner_for)
from tasks.statistics import compute_statistics
from tasks.record import (check_unchanged, fail_tracking, is_stop, mark_success, record_merge, record_results,
                          register_best, start_tracking)


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
    CLOCK.plan(compile_plan(config).counts())  # the stages of the plan `mergeflow plan` prints
    storage, device = config.storage, config.device
    names = [t.name for t in config.tasks]
    base = fetch_pretrained(config.model, storage)
    datasets, heads = submit_task_inputs(config, base)
    experts = _experts(config, base, datasets, heads, parent)
    eval_inputs = {n: (datasets[n].result(), heads[n].result()) for n in names}
    digest = run_inputs_digest(config.model_dump(mode="json"), base, experts, eval_inputs)
    if config.skip_unchanged and (last := check_unchanged(config.name, digest, storage, config.tracking, parent)):
        return {"run": config.name, "skipped": True, "mlflow_run_id": parent, "same_as": last,
                "experts": {n: e.model_dump() for n, e in experts.items()}}

    kinds = statistics_stage.statistic_kinds(config.merges)
    statistics = {}
    if kinds:  # data-aware methods: Grams / Fisher of every expert on its own task's data
        futures = {n: compute_statistics.submit(n, base, experts[n], eval_inputs[n][0], eval_inputs[n][1], kinds,
                                                config.statistics, storage, device, config.tracking, parent)
                   for n in names}
        statistics = {n: f.result() for n, f in futures.items()}

    # the per-layer factors the subspace methods read (merges and sweep points alike), built once per kind
    subspaces = {kind: build_subspace.submit(kind, base, experts, storage, device, config.tracking, parent)
                 for kind in subspace_stage.subspace_kinds(config.merges)}

    plan = dict(zip(config.merge_labels(), config.merges))
    registers = bool(config.tracking.registered_model)
    # validation scores of the experts: the reference of every choice (sweeps, the model to register and promote)
    chooses = registers or any(spec.sweep is not None or spec.method == AUTO for spec in plan.values())
    expert_val = score_on_validation(config, parent, base, experts, eval_inputs) if chooses else {}
    # validation examples that are also training examples bias every choice: warned about before scoring
    overlap = check_overlap.submit(base, eval_inputs, storage, config.tracking, parent) if chooses else None
    plan.update(tune(config, parent, plan, base, experts, eval_inputs, expert_val, subspaces, statistics))
    if overlap is not None:
        overlap.result()
    merged_futures = {label: (spec, _submit_merge(config, parent, label, spec, base, experts, eval_inputs,
                                                  statistics, subspaces))
                      for label, spec in plan.items()}

    def score(label: str, weights: ObjectRef | None):
        return evaluate.submit(label, weights, base, eval_inputs, config.evaluation, storage, device,
                               config.tracking, parent)

    scored = {"pretrained": score("pretrained", None)}
    for n, expert in experts.items():
        scored[f"expert:{n}"] = score(f"expert-{n}", expert)
    merged = {label: (spec, future.result()) for label, (spec, future) in merged_futures.items()}
    for label, (spec, (ref, _)) in merged.items():
        scored[label] = score(label, ref)
    # the registered model is chosen, and promoted, on validation scores; test scores only report
    validation = (score_on_validation(config, parent, base, {label: ref for label, (_, (ref, _)) in merged.items()},
                                      eval_inputs, all_tasks=True) if registers else {})
    rows = {model: future.result() for model, future in scored.items()}
    expert_acc = {n: rows[f"expert:{n}"][n] for n in names}
    expert_val_acc = {n: f.result()[n] for n, f in expert_val.items()}

    datasets_by_task = {n: eval_inputs[n][0] for n in names}
    logged = [record_merge(label, spec, ref, record, rows[label], expert_acc, datasets_by_task, storage,
                           config.tracking, parent,
                           validation[label].result() if label in validation else None, expert_val_acc)
              for label, (spec, (ref, record)) in merged.items()]
    registration = register_best(config.tracking, parent, logged)
    table = format_results_table(rows, names, expert_acc)
    summary = {
        "run": config.name,
        "mlflow_run_id": parent,
        "table": table,
        "accuracy": rows,
        "merged": {label: ref.model_dump() for label, (_, (ref, _)) in merged.items()},
        "experts": {n: e.model_dump() for n, e in experts.items()},
        "base": base.model_dump(),
        "registration": registration,
    }
    record_results(config.tracking, parent, rows, expert_acc, table, summary)
    publish_artifacts(config.name, rows, names, expert_acc, table, config.tracking, parent, registration)
    mark_success(config.name, {"inputs_digest": digest, "flow_run_id": str(runtime.flow_run.id),
                               "mlflow_run_id": parent, "merged": summary["merged"],
                               "stage_seconds": CLOCK.means()}, storage)
    return summary


def submit_task_inputs(config: RunConfig, base: ModelRef) -> tuple[dict[str, Any], dict[str, Any]]:
    """Futures of every task's dataset and frozen head (made by the model's family, or the task's own file)."""
    storage, device = config.storage, config.device
    datasets = {t.name: prepare_dataset.submit(t.name, config.data, storage, t.dataset, config.model.family)
                for t in config.tasks}
    heads = {t.name: fit_head.submit(t.name, base, datasets[t.name], config.evaluation, storage, device, t.head)
             for t in config.tasks}
    return datasets, heads


def _experts(config: RunConfig, base: ObjectRef, datasets, heads, parent: str) -> dict[str, ObjectRef]:
    """Each task's expert: the given checkpoint, the newest under its prefix, or fine-tuned (a stored expert with
    the same inputs is reused)."""
    storage, device = config.storage, config.device
    pending = {}
    for t in config.tasks:
        if t.expert:
            pending[t.name] = fetch_expert.submit(t.name, t.expert, storage)
        elif t.latest:
            pending[t.name] = fetch_latest_expert.submit(t.name, t.latest, storage)
        else:
            pending[t.name] = finetune_expert.submit(t.name, base, datasets[t.name], heads[t.name], config.finetune,
                                                     storage, device, config.tracking, parent)
    return {n: f.result() for n, f in pending.items()}


def _submit_merge(config: RunConfig, parent: str, label: str, spec: MergeSpec, base: ObjectRef,
                  experts: dict[str, ObjectRef], eval_inputs, statistics: dict[str, ObjectRef], subspaces):
    """Submit one merge (its global pass, the merge itself or its layer-group parts and assembly) into a
    location keyed by everything it reads, with the futures of the subspaces its method reads; returns the future
    of (reference, record)."""
    storage, device = config.storage, config.device
    data_aware = bool(statistics_stage.statistic_kinds([spec]))
    learns = merge_stage.needs_objective(spec)
    # a learned method chosen by `auto` learned on the validation inputs: its merge does too (the cached point)
    searched = getattr(dict(zip(config.merge_labels(), config.merges)).get(label), "method", None) == AUTO
    split = "validation" if searched else config.statistics.unlabeled_split
    unlabeled = (eval_inputs, split, config.evaluation) if learns else None
    out_uri = merge_stage.merge_location(config.name, label, spec, base, experts, storage.root,
                                         statistics if data_aware else None, (eval_inputs, split) if learns else None)
    stats = statistics if data_aware else None
    reads = {kind: subspaces[kind] for kind in subspace_stage.subspace_kinds([spec])} or None
    # methods that read statistics or data in prepare() prepare on the pool they merge: no separate stage
    if sparsifies(spec):
        state = sparsify.submit(spec, base, experts, storage, device, config.tracking, parent)
    else:
        state = None
        print(f"sparsify: skipped for {label} ({spec.method} has no separate global pass)")
    if config.merge_parts > 1 and not learns:  # layer groups as separate tasks, then one assembly
        parts = [merge_part.submit(spec, base, experts, out_uri, i, config.merge_parts, storage, state, device, stats,
                                   reads) for i in range(config.merge_parts)]
        return assemble_merge.submit(label, parts, out_uri, storage)
    return merge.submit(spec, base, experts, out_uri, storage, state, device, stats, unlabeled, reads)


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
