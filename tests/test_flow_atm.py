"""ATM through its flow: both variants on tiny real tasks; each round fine-tunes from the current model, merges
the round's updates with the configured rule, and is recorded by round."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def _config(tmp_path, cache, atm, merges=({"method": "ties"},)):
    from mergeflow.config import RunConfig

    return RunConfig.model_validate({
        "name": "atm",
        "tasks": [{"name": "election"}, {"name": "rotten_tomatoes"}],
        "data": {"probe_per_class": 2, "train": 16, "validation": 8, "test": 16},
        "finetune": {"steps": 4, "batch_size": 4, "max_length": 16, "warmup_steps": 1},
        "evaluation": {"max_length": 16},
        "merges": list(merges),
        "atm": atm,
        "storage": {"root": str(tmp_path / "store"), "cache_dir": str(cache)},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "atm"},
        "device": "cpu",
    })


def test_atm_rounds_merge_updates_from_the_current_model(tmp_path, tmp_path_factory, prefect_harness):
    import torch
    from mlflow.tracking import MlflowClient

    from flows.atm_flow import atm_flow
    from mergeflow.checkpoints import open_checkpoint

    cache = tmp_path_factory.mktemp("cache")
    summary = atm_flow(_config(tmp_path, cache, {"rounds": 2}))
    assert summary["variant"] == "from_pretrained" and summary["steps_per_round"] == 2
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    history = client.get_metric_history(summary["mlflow_run_id"], "atm.acc.avg")
    assert sorted(m.step for m in history) == [1, 2]
    children = client.search_runs([client.get_experiment_by_name("atm").experiment_id],
                                  f"tags.mlflow.parentRunId = '{summary['mlflow_run_id']}' and "
                                  "tags.`mergeflow.stage` = 'atm-finetune'")
    assert {r.info.run_name for r in children} == {"atm-1-election", "atm-1-rotten_tomatoes", "atm-2-election",
                                                   "atm-2-rotten_tomatoes"}
    # round 2 = round 1 + mean of the round-2 updates, each fine-tuned from round 1's model
    round1, round2 = (open_checkpoint(r["uri"]) for r in summary["rounds"])
    starts = {r.data.params["output_uri"]: r for r in children if r.data.tags["mergeflow.round"] == "2"}
    finetuned = [open_checkpoint(uri) for uri in starts]
    name = "encoder.layer.0.attention.self.query.weight"
    expected = round1.get(name) + torch.stack([f.get(name) - round1.get(name) for f in finetuned]).mean(0)
    torch.testing.assert_close(round2.get(name), expected, atol=1e-6, rtol=0)

    posthoc = atm_flow(_config(tmp_path, cache, {"variant": "posthoc", "start": "ties", "rounds": 1,
                                                  "steps_per_round": 2}))
    assert "ties (start)" in posthoc["table"] and len(posthoc["rounds"]) == 1
    inputs = {i.tags[0].value: i for r in client.search_runs(
        [client.get_experiment_by_name("atm").experiment_id],
        f"tags.mlflow.parentRunId = '{posthoc['mlflow_run_id']}' and tags.`mergeflow.stage` = 'atm-finetune'")
        for i in r.inputs.dataset_inputs}
    assert "validation" in inputs and "train" not in inputs  # post-hoc rounds read the validation split only


def test_posthoc_needs_a_merge_of_the_config():
    from mergeflow.config import RunConfig

    with pytest.raises(ValueError, match="atm.start"):
        RunConfig.model_validate({"tasks": [{"name": "election"}], "merges": [{"method": "ties"}],
                                  "atm": {"variant": "posthoc", "start": "dare"}})
    with pytest.raises(ValueError, match="data-free rule"):
        RunConfig.model_validate({"tasks": [{"name": "election"}], "merges": [{"method": "ties"}],
                                  "atm": {"merge": {"method": "regmean"}}})


def test_posthoc_atm_refines_the_winner_of_an_auto_search_on_training_data(tmp_path, tmp_path_factory,
                                                                         prefect_harness):
    """`method: auto` then post-hoc ATM from its winner, the rounds fine-tuned on the train split (the search chose
    on validation; test only reports)."""
    from mlflow.tracking import MlflowClient

    from flows.atm_flow import atm_flow

    search = {"methods": ["task_arithmetic", "ties"], "grids": {"task_arithmetic": {"scaling": [0.3, 1.0]},
                                                               "ties": {"scaling": [0.5]}}, "min_examples": 2}
    config = _config(tmp_path, tmp_path_factory.mktemp("cache"), {
        "variant": "posthoc", "start": "auto", "split": "train", "rounds": 1, "steps_per_round": 2},
        merges=[{"method": "auto", "search": search}])
    summary = atm_flow(config)
    assert "auto (start)" in summary["table"] and len(summary["rounds"]) == 1
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("atm").experiment_id
    rounds = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{summary['mlflow_run_id']}' and "
                                "tags.`mergeflow.stage` = 'atm-finetune'")
    contexts = {i.tags[0].value for r in rounds for i in r.inputs.dataset_inputs}
    assert "train" in contexts and "validation" not in contexts  # rounds learn on train only
    start = client.search_runs([experiment], "tags.mlflow.runName = 'atm-start'")
    assert start, "the auto search ran as the start's merge flow"
