"""Task data of one's own: a dataset directory in the documented layout (task.json + <split>.parquet with text and
label) is used where it lies, referenced by its digest, and malformed ones are named before any model runs."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mergeflow.config import RunConfig
from mergeflow.families.text.data import SplitSizes, TextTask, load_text_task, save_text_task
from mergeflow.errors import ConfigError

pytestmark = pytest.mark.slow


def _custom(tmp_path_factory, directory):
    task = load_text_task("election", cache_dir=tmp_path_factory.getbasetemp() / "wheels",
                          sizes=SplitSizes(probe_per_class=2, train=16, validation=4, test=16))
    save_text_task(TextTask(name="tweets", class_names=task.class_names, splits=task.splits), directory)
    return directory


def _config(tmp_path, cache, dataset):
    return RunConfig.model_validate({
        "name": "custom", "tasks": [{"name": "tweets", "dataset": str(dataset)}, {"name": "rotten_tomatoes"}],
        "data": {"probe_per_class": 2, "train": 16, "validation": 4, "test": 16},
        "finetune": {"steps": 2, "batch_size": 4, "max_length": 16, "warmup_steps": 1},
        "evaluation": {"max_length": 16}, "merges": [{"method": "task_arithmetic"}],
        "storage": {"root": str(tmp_path / "store"), "cache_dir": str(cache)},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "custom"}, "device": "cpu",
    })


def test_flow_uses_a_dataset_directory_in_place(tmp_path, tmp_path_factory, prefect_harness):
    from mlflow.tracking import MlflowClient

    from flows.merge_flow import merge_flow

    dataset = _custom(tmp_path_factory, tmp_path / "my-data" / "tweets")
    summary = merge_flow(_config(tmp_path, tmp_path_factory.mktemp("cache"), dataset))
    assert set(summary["accuracy"]["task_arithmetic"]) == {"tweets", "rotten_tomatoes"}
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("custom").experiment_id],
                              "attributes.run_name = 'expert-tweets'")
    assert runs[0].data.params["dataset_uri"] == str(dataset)
    assert not (tmp_path / "store" / "datasets").exists() or not list((tmp_path / "store" / "datasets").glob("tweets*"))


def test_malformed_datasets_are_named(tmp_path, tmp_path_factory, cache):
    from mergeflow.config import StorageConfig
    from mergeflow.stages.data import prepare_dataset
    from mergeflow.stages.store import Store

    with pytest.raises(ValueError, match="'tweets' is not a built-in hf_text task"):
        RunConfig.model_validate({"tasks": [{"name": "tweets"}], "merges": [{"method": "average"}]})
    dataset = _custom(tmp_path_factory, tmp_path / "bad")
    pq.write_table(pa.table({"sentence": ["a"], "label": [0]}), dataset / "validation.parquet")
    storage = Store.of(StorageConfig(root=str(tmp_path / "store"), cache_dir=str(tmp_path / "c")))
    with pytest.raises(ConfigError, match=r"tasks\[tweets\].dataset: .*validation.parquet has no column text"):
        prepare_dataset("tweets", RunConfig.model_fields["data"].default_factory(), storage, str(dataset))
    (dataset / "test.parquet").unlink()
    with pytest.raises(ConfigError, match="lacks test.parquet"):
        prepare_dataset("tweets", RunConfig.model_fields["data"].default_factory(), storage, str(dataset))
