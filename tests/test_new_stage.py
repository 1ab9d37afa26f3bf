"""A new stage is one stage definition (`Stage`: where its output lands, how it runs) and one planner entry (its kind
among the plan's stages, its node in the plan): `mergeflow plan` locates it, the command line's executor runs it
in process, and the flow runs it in the generic stage task with an MLflow child run, with no task, resolver or
executor method of its own."""

from __future__ import annotations

from pathlib import Path

import torch

from factories import tiny_state_dict
from mergeflow.checkpoints import open_checkpoint
from mergeflow.checkpoints.safetensors_format import save_safetensors
from mergeflow.config import RunConfig
from mergeflow.plan import compile_plan
from mergeflow.stages.in_process import InProcessRun
from mergeflow.stages.plan_status import plan_status
from mergeflow.stages.refs import fingerprint
from mergeflow.stages.stage import Context, Located, Node, Stage
from mergeflow.stages.store import Store
from mergeflow.storage import join


# ------------------------------------------------------------------ the whole of a new stage: where and run

def _where(node: Node, ctx: Context) -> Located:
    uri = join(ctx.store.root, "counts", f"{fingerprint([e.sha256 for e in ctx.experts.values()])}.json")
    return uri, lambda: ctx.store.file_ref(uri)


def _run(node: Node, ctx: Context):
    uri = _where(node, ctx)[0]
    counts = {}
    for name, expert in ctx.experts.items():
        with open_checkpoint(expert.uri, cache=ctx.store.cache) as ckpt:
            counts[name] = sum(ckpt.get(key).numel() for key in ckpt.keys())
    ctx.store.publish_json(uri, counts)
    return ctx.store.file_ref(uri)


COUNT = Stage("count_parameters", _where, _run)


def _config(tmp_path: Path) -> tuple[RunConfig, int]:
    experts = {}
    for i, name in enumerate(["election", "reuters"]):
        state = {k: v + 0.01 * (i + 1) for k, v in tiny_state_dict().items()}
        save_safetensors(state, tmp_path / f"{name}.safetensors")
        experts[name] = str(tmp_path / f"{name}.safetensors")
    config = RunConfig.model_validate({
        "name": "new-stage", "tasks": [{"name": n, "expert": uri} for n, uri in experts.items()],
        "merges": [{"method": "task_arithmetic"}],
        "storage": {"root": str(tmp_path / "store"), "cache_dir": str(tmp_path / "cache")},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "new-stage"},
        "device": "cpu"})
    return config, sum(t.numel() for t in tiny_state_dict().values())


def _planned(config: RunConfig):
    plan = compile_plan(config)
    plan.stages = {**plan.stages, COUNT.name: COUNT}  # the planner entry: the kind, and its node
    plan.add("count", COUNT.name, ["expert:election", "expert:reuters"], "parameters per expert")
    return plan


def test_plan_status_and_the_command_line_run_a_stage_from_its_definition(tmp_path):
    config, parameters = _config(tmp_path)
    plan, store = _planned(config), Store.of(config.storage)
    assert plan_status(config, plan, store)["count"] == "to run"
    run = InProcessRun(config, store, "cpu", plan)
    run.walk(["count"])
    assert [n for n in run.outputs] == ["expert:election", "expert:reuters", "count"]  # only what it reads ran
    assert store.read_json(run.value("count").uri) == {"election": parameters, "reuters": parameters}
    assert plan_status(config, plan, store)["count"] == "stored"


def test_the_flow_runs_a_stage_without_a_task_of_its_own_in_the_generic_stage_task(tmp_path):
    import mlflow

    from flows.plan_run import PlanRun
    from tasks.stage import run_stage
    from tasks.tracking import MlflowTracker

    config, parameters = _config(tmp_path)
    plan, store = _planned(config), Store.of(config.storage)
    assert getattr(PlanRun, COUNT.name, None) is None  # no executor method: the generic task runs it
    parent = MlflowTracker(config.tracking).start_run("parent")
    experts = {f"expert:{t.name}": store.checkpoint_ref(t.expert) for t in config.tasks}
    ref = run_stage.fn(plan.node("count"), config, experts, parent)
    assert store.read_json(ref.uri) == {"election": parameters, "reuters": parameters}
    client = mlflow.MlflowClient(config.tracking.tracking_uri)
    child = client.search_runs([client.get_experiment_by_name("new-stage").experiment_id],
                               "tags.mergeflow.stage = 'count_parameters'")[0]
    assert child.data.tags["mlflow.parentRunId"] == parent and child.data.params["output_uri"] == ref.uri
    assert torch.isfinite(torch.tensor(child.data.metrics["seconds"]))


def test_the_flow_executor_sends_a_kind_without_a_method_to_the_generic_stage_task(tmp_path, monkeypatch):
    """`PlanRun.run` dispatches the new kind to `run_stage` under the kind's name, with its inputs' outputs (the
    Prefect submission is replaced by a direct call of the task's body; removing the fallback fails here)."""
    from types import SimpleNamespace

    import flows.plan_run as plan_run
    from mergeflow.stages.stage import Plan
    from tasks.stage import run_stage
    from tasks.tracking import MlflowTracker

    config, parameters = _config(tmp_path)
    store, full = Store.of(config.storage), _planned(config)
    plan = Plan(config.name, full.stages, [full.node("count")])  # only the new node; its inputs given below
    named = []

    def with_options(name):
        named.append(name)
        return SimpleNamespace(submit=lambda *args: run_stage.fn(*args))

    monkeypatch.setattr(plan_run, "run_stage", SimpleNamespace(with_options=with_options))
    monkeypatch.setattr(plan_run.CLOCK, "plan", lambda counts: None)
    run = plan_run.PlanRun(config, MlflowTracker(config.tracking).start_run("parent"), plan)
    run.outputs.update({f"expert:{t.name}": store.checkpoint_ref(t.expert) for t in config.tasks})
    run.run()
    assert named == ["count_parameters"]
    assert store.read_json(run.outputs["count"].uri) == {"election": parameters, "reuters": parameters}
