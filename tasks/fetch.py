"""Fetch stage: pretrained model, task data and existing experts into the store/cache, as references."""

from __future__ import annotations

from prefect import task

from mergeflow.stages import data as data_stage, fetch as fetch_stage
from mergeflow.stages.refs import ModelRef, ObjectRef
from mergeflow.config import DataConfig, ModelConfig, StorageConfig
from tasks import IO_RETRIES, TIMEOUTS
from tasks.credentials import store_for, uses_storage


@task(name="fetch-pretrained", timeout_seconds=TIMEOUTS["io"], **IO_RETRIES)
@uses_storage
def fetch_pretrained(model: ModelConfig, storage: StorageConfig) -> ModelRef:
    store = store_for(storage)
    return fetch_stage.materialize_pretrained(model, store)


@task(name="prepare-dataset", task_run_name="prepare-dataset-{task_name}",
      timeout_seconds=TIMEOUTS["io"], **IO_RETRIES)
@uses_storage
def prepare_dataset(task_name: str, data: DataConfig, storage: StorageConfig, dataset: str | None = None,
                    family: str = "hf_text") -> ObjectRef:
    store = store_for(storage)
    return data_stage.prepare_dataset(task_name, data, store, dataset, family)


@task(name="fetch-expert", task_run_name="fetch-expert-{task_name}", timeout_seconds=TIMEOUTS["io"], **IO_RETRIES)
@uses_storage
def fetch_expert(task_name: str, uri: str, storage: StorageConfig) -> ObjectRef:
    store = store_for(storage)
    return fetch_stage.fetch_checkpoint(uri, store)


@task(name="fetch-latest-expert", task_run_name="fetch-latest-expert-{task_name}",
      timeout_seconds=TIMEOUTS["io"], **IO_RETRIES)
@uses_storage
def fetch_latest_expert(task_name: str, prefix: str, storage: StorageConfig) -> ObjectRef:
    """The newest checkpoint under `prefix` (nightly "latest experts" mode)."""
    store = store_for(storage)
    uri = fetch_stage.latest_checkpoint(prefix, store)
    print(f"{task_name}: newest expert under {prefix} is {uri}")
    return fetch_stage.fetch_checkpoint(uri, store)
