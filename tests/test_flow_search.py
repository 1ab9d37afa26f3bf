"""`method: auto` through the flow: successive halving over data-free and data-aware candidates, one task per
candidate and rung, selection on validation only, the winner merged and tested, the leaderboard recorded; a second
run with a larger budget scores only the new rung."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SEARCH = {"methods": ["task_arithmetic", "ties", "tsv", "regmean"],
          "grids": {"task_arithmetic": {"scaling": [0.3, 1.0]}, "ties": {"density": [0.5], "scaling": [0.5, 1.0]},
                    "tsv": {"alpha": [1.0, 2.0]}, "regmean": {"reduce_non_diagonal_ratio": [0.95]}},
          "min_examples": 2, "eta": 3}
CANDIDATES = 7


def _config(tmp_path, cache, max_evaluations):
    from mergeflow.config import RunConfig

    return RunConfig.model_validate({
        "name": "search",
        "tasks": [{"name": "election"}, {"name": "rotten_tomatoes"}],
        "data": {"probe_per_class": 2, "train": 16, "validation": 8, "test": 16},
        "finetune": {"steps": 2, "batch_size": 4, "max_length": 16, "warmup_steps": 1},
        "evaluation": {"max_length": 16},
        "statistics": {"max_examples": 8, "max_length": 16},
        "merges": [{"method": "auto", "search": {**SEARCH, "max_evaluations": max_evaluations}}],
        "tuning": {"max_examples": 6},  # rungs: 2 examples per task, then 6
        "storage": {"root": str(tmp_path / "store"), "cache_dir": str(cache)},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "search"},
        "device": "cpu",
    })


def _search_points(client, experiment_id, parent_run_id):
    search = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}' and "
                                "tags.`mergeflow.stage` = 'search'")
    assert len(search) == 1
    points = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{search[0].info.run_id}'")
    return search[0], points


def test_auto_searches_on_validation_only_and_a_larger_budget_scores_only_new_rungs(tmp_path, tmp_path_factory,
                                                                                    prefect_harness, split_reads):
    from mlflow.tracking import MlflowClient

    from flows.merge_flow import merge_flow

    cache = tmp_path_factory.mktemp("cache")
    first = merge_flow(_config(tmp_path, cache, max_evaluations=CANDIDATES * 2))  # the first rung only

    assert "auto" in first["accuracy"]
    selection = [(name, split) for name, split in split_reads
                 if name.startswith(("sweep-", "search-", "open-search", "record-search", "compute_statistics"))
                 or name.endswith("-validation")]
    assert selection and all(split == "validation" for _, split in selection), selection
    assert any(split == "test" for name, split in split_reads if name == "evaluate-auto")

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent = client.get_run(first["mlflow_run_id"])
    search, points = _search_points(client, parent.info.experiment_id, parent.info.run_id)
    assert len(points) == CANDIDATES and {p.data.tags["mergeflow.rung"] for p in points} == {"0"}
    assert {p.data.tags["mergeflow.method"] for p in points} == {"task_arithmetic", "ties", "tsv", "regmean"}
    assert search.data.params["stopped"].startswith("budget")
    assert int(float(search.data.metrics["rungs_done"])) == 1
    chosen = parent.data.params["tune.auto.method"]
    statistics = {r.info.run_name for r in client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}' and "
        "tags.`mergeflow.stage` = 'statistics'")}
    assert {"statistics-election@0.1", "statistics-rotten_tomatoes@0.1"} <= statistics  # what rung 0 reads
    assert ("statistics-election" in statistics) == (chosen == "regmean")  # the full ones: for a data-aware winner
    merged = json.loads((Path(first["merged"]["auto"]["uri"]) / "mergeflow.json").read_text())
    assert merged["method"] == chosen
    board = json.loads(Path(client.download_artifacts(search.info.run_id, "search/auto.json",
                                                      str(tmp_path))).read_text())
    assert len(board["leaderboard"]) == CANDIDATES and board["winner"]["method"] == chosen
    assert {a.path for a in client.list_artifacts(search.info.run_id, "search")} >= {"search/auto.png"}

    second = merge_flow(_config(tmp_path, cache, max_evaluations=None))  # the budget grown: rung 1 runs too
    _, rerun = _search_points(client, parent.info.experiment_id, second["mlflow_run_id"])
    fresh = [p for p in rerun if p.data.tags["mergeflow.reused"] == "false"]
    rungs = [p.data.tags["mergeflow.rung"] for p in rerun]
    assert rungs.count("0") == CANDIDATES and rungs.count("1") >= 3  # rung 0 again, then at least the best third
    assert "0" not in {p.data.tags["mergeflow.rung"] for p in fresh} and len(fresh) == len(rerun) - CANDIDATES
    assert client.get_run(second["mlflow_run_id"]).data.params["tune.auto.method"] in {
        "task_arithmetic", "ties", "tsv", "regmean"}


def test_a_learned_candidate_learns_on_validation_inputs_and_its_point_is_what_gets_merged(
        tmp_path, tmp_path_factory, prefect_harness, split_reads):
    """AdaMerging named in search.methods: each point learns its coefficients on the unlabeled validation inputs
    (a test split is read only by the final evaluation), and the winner's merge writes the searched point instead
    of learning again (its merge task reads no data)."""
    from mlflow.tracking import MlflowClient

    from flows.merge_flow import merge_flow

    config = _config(tmp_path, tmp_path_factory.mktemp("cache"), max_evaluations=None)
    spec = config.merges[0].model_copy(update={"search": config.merges[0].search.model_copy(update={
        "methods": ["adamerging"], "grids": {"adamerging": {"steps": [1, 2], "granularity": ["task"]}}})})
    result = merge_flow(config.model_copy(update={"merges": [spec]}))

    reads = [(name, split) for name, split in split_reads if name.startswith("sweep-")]
    assert reads and all(split == "validation" for _, split in reads), reads
    assert not [name for name, _ in split_reads if name.startswith("merge-")]  # the cached point, not learned again
    assert "evaluate-auto" in {name for name, split in split_reads if split == "test"}
    assert not [name for name, split in split_reads if split == "test" and name.startswith(("sweep-", "merge-"))]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.data.params["tune.auto.method"] == "adamerging"
    _, points = _search_points(client, parent.info.experiment_id, parent.info.run_id)
    assert {p.data.params["learn_on"] for p in points} == {"validation"}
    merged = json.loads((Path(result["merged"]["auto"]["uri"]) / "mergeflow.json").read_text())
    assert merged["method"] == "adamerging"
