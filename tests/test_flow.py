"""The Prefect merge flow end to end on the real MiniLM and real data (tiny budgets), recorded in MLflow
(sqlite), with a local folder as object store; a rerun reuses the stored experts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow


def _config(tmp_path: Path, cache: Path):
    from mergeflow.config import RunConfig

    raw = {
        "name": "tiny",
        "tasks": [{"name": "election"}, {"name": "rotten_tomatoes"}],
        "data": {"probe_per_class": 2, "train": 16, "validation": 4, "test": 24},
        "finetune": {"steps": 3, "batch_size": 4, "max_length": 16, "warmup_steps": 1},
        "evaluation": {"max_length": 16},
        "merges": [{"method": "average"}, {"method": "task_arithmetic", "params": {"scaling": 0.5}},
                   {"method": "ties"}],
        "storage": {"root": str(tmp_path / "store"), "cache_dir": str(cache)},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "tiny"},
        "device": "cpu",
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(raw))
    return RunConfig.model_validate(raw)


def test_flow_runs_end_to_end_and_reuses_experts(tmp_path, tmp_path_factory, prefect_harness):
    from mlflow.tracking import MlflowClient

    from flows.merge_flow import merge_flow
    from mergeflow.checkpoints import open_checkpoint

    config = _config(tmp_path, tmp_path_factory.mktemp("cache"))
    first = merge_flow(config)

    assert set(first["accuracy"]) == {"pretrained", "expert:election", "expert:rotten_tomatoes", "average",
                                      "task_arithmetic", "ties"}
    for row in first["accuracy"].values():
        assert set(row) == {"election", "rotten_tomatoes"} and all(0.0 <= v <= 1.0 for v in row.values())
    assert "| ties" in first["table"] and "norm. avg" in first["table"]
    for label, ref in first["merged"].items():
        ckpt = open_checkpoint(ref["uri"])
        assert ckpt.digest == ref["sha256"] and ckpt.metadata["merge_method"] == label
        inputs = json.loads(ckpt.metadata["inputs"])
        assert {i["uri"] for i in inputs if i["role"] == "expert"} == {e["uri"] for e in first["experts"].values()}

    client = MlflowClient(config.tracking.tracking_uri)
    parent = client.get_run(first["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["merges.2.method"] == "ties"
    assert "ties.acc.avg" in parent.data.metrics and "pretrained.acc.election" in parent.data.metrics
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_name = {r.info.run_name: r for r in children}
    assert set(by_name) == {"expert-election", "expert-rotten_tomatoes", "merge-average", "merge-task_arithmetic",
                            "merge-ties"}
    ties = by_name["merge-ties"]
    assert ties.data.params["param.density"] == "0.2" and "norm_acc.avg" in ties.data.metrics
    assert ties.data.tags["mergeflow.model_sha256"] == first["merged"]["ties"]["sha256"]
    artifacts = {a.path for a in client.list_artifacts(ties.info.run_id, "merged_model")}
    assert "merged_model/model.safetensors" in artifacts and "merged_model/mergeflow.json" in artifacts
    losses = client.get_metric_history(by_name["expert-election"].info.run_id, "train_loss")
    assert len(losses) == 3

    second = merge_flow(config)  # unchanged inputs: stored experts are reused, merges give the same digests
    assert second["experts"] == first["experts"] and second["merged"] == first["merged"]
    reruns = client.search_runs([parent.info.experiment_id],
                                f"tags.mlflow.parentRunId = '{second['mlflow_run_id']}'")
    assert {r.data.tags["mergeflow.reused"] for r in reruns if r.info.run_name.startswith("expert-")} == {"true"}
