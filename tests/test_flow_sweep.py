"""Validation-tuned merging through the flow: one task per grid point, the chosen point merged, tested and
recorded; selection never reads a test split; a grown grid scores only its new point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _config(tmp_path, cache, scalings):
    from mergeflow.config import RunConfig

    return RunConfig.model_validate({
        "name": "sweep",
        "tasks": [{"name": "election"}, {"name": "rotten_tomatoes"}],
        "data": {"probe_per_class": 2, "train": 16, "validation": 8, "test": 16},
        "finetune": {"steps": 2, "batch_size": 4, "max_length": 16, "warmup_steps": 1},
        "evaluation": {"max_length": 16},
        "merges": [{"method": "task_arithmetic", "sweep": {"scaling": scalings}},
                   {"method": "ties", "params": {"density": 0.5}, "sweep": {"scaling": [0.5, 1.0]}}],
        "tuning": {"max_examples": 6},
        "storage": {"root": str(tmp_path / "store"), "cache_dir": str(cache)},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "sweep"},
        "device": "cpu",
    })


def test_sweep_selects_on_validation_only_and_caches_points(tmp_path, tmp_path_factory, prefect_harness,
                                                            split_reads):
    from mlflow.tracking import MlflowClient

    from flows.merge_flow import merge_flow

    reads = split_reads
    cache = tmp_path_factory.mktemp("cache")
    first = merge_flow(_config(tmp_path, cache, [0.2, 1.0]))
    from mergeflow.plan import compile_plan
    from tasks.progress import CLOCK

    # the plan the flow compiled is what it ran (the sweep points and their shared sparsify passes included), and
    # after the run every stage is stored where the plan looks, the swept merges where their chosen point put them
    from mergeflow.stages.plan_status import RUNS, STORED, plan_status
    from mergeflow.stages.store import Store

    config = _config(tmp_path, cache, [0.2, 1.0])
    plan = compile_plan(config)
    assert {kind: len(times) for kind, times in CLOCK.done.items()} == plan.counts()
    after = plan_status(config, plan, Store.of(config.storage))
    assert {node: state for node, state in after.items() if state not in (STORED, RUNS)} == {}
    assert after["merge:ties-tuned"] == STORED

    assert {"task_arithmetic-tuned", "ties-tuned"} <= set(first["accuracy"])
    selection = [(name, split) for name, split in reads
                 if name.startswith(("sweep-", "select-")) or name.endswith("-validation")]
    assert selection and all(split == "validation" for _, split in selection), selection
    assert any(split == "test" for name, split in reads if name == "evaluate-task_arithmetic-tuned")

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent = client.get_run(first["mlflow_run_id"])
    chosen = float(parent.data.params["tune.task_arithmetic-tuned.scaling"])
    assert chosen in (0.2, 1.0) and parent.data.params["tune.task_arithmetic-tuned.rule"] == "norm_acc.avg"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweeps")}
    assert {"sweeps/task_arithmetic-tuned.png", "sweeps/task_arithmetic-tuned.json"} <= artifacts
    merged_meta = json.loads((Path(first["merged"]["task_arithmetic-tuned"]["uri"]) / "mergeflow.json").read_text())
    assert merged_meta["params"]["scaling"] == chosen
    sweep_runs = client.search_runs([parent.info.experiment_id],
                                    f"tags.mlflow.parentRunId = '{parent.info.run_id}' and "
                                    "tags.`mergeflow.stage` = 'sweep'")
    assert len(sweep_runs) == 4 and all(r.data.tags["mergeflow.reused"] == "false" for r in sweep_runs)
    points = list((tmp_path / "store" / "sweeps").glob("*.json"))
    assert len(points) == 4 and not list((tmp_path / "store").rglob("*sweep*.safetensors"))

    second = merge_flow(_config(tmp_path, cache, [0.2, 0.6, 1.0]))  # one new point: only it is scored
    reruns = client.search_runs([parent.info.experiment_id],
                                f"tags.mlflow.parentRunId = '{second['mlflow_run_id']}' and "
                                "tags.`mergeflow.stage` = 'sweep'")
    fresh = [r for r in reruns if r.data.tags["mergeflow.reused"] == "false"]
    assert len(reruns) == 5 and len(fresh) == 1 and fresh[0].data.params["param.scaling"] == "0.6"
