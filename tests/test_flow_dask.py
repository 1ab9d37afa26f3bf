"""Scale-out: the demo-shaped flow on a local Dask cluster of two worker processes, with every merge split into
two layer-group tasks, gives the same merged weights (digests) as the single-process run. Dask workers run torch on one thread (OMP_NUM_THREADS=1), and CPU
float reductions depend on the thread count, so the reference runs on one thread too."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def _config(tmp_path, cache, runner):
    from mergeflow.config import RunConfig

    return RunConfig.model_validate({
        "name": f"scale-{runner}",
        "tasks": [{"name": "election"}, {"name": "rotten_tomatoes"}],
        "data": {"probe_per_class": 2, "train": 16, "validation": 4, "test": 16},
        "finetune": {"steps": 2, "batch_size": 4, "max_length": 16, "warmup_steps": 1},
        "evaluation": {"max_length": 16},
        "merges": [{"method": "task_arithmetic"}, {"method": "ties"}, {"method": "regmean"}],
        "statistics": {"max_examples": 4, "max_length": 16},
        "storage": {"root": str(tmp_path / "store"), "cache_dir": str(cache)},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "scale"},
        "device": "cpu",
        "max_workers": 2,
        "merge_parts": 2,
        "task_runner": runner,
    })


def test_dask_cluster_gives_the_single_process_digests(tmp_path, tmp_path_factory, prefect_harness):
    from flows.merge_flow import merge_flow
    from tasks.runners import task_runner_for

    import torch

    cache = tmp_path_factory.mktemp("cache")
    single = _config(tmp_path, cache, "threads").model_copy(update={"max_workers": 1})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = merge_flow.with_options(task_runner=task_runner_for(single))(single)
    finally:
        torch.set_num_threads(threads)
    import shutil

    shutil.rmtree(tmp_path / "store")  # same URIs (they are in the provenance), nothing left to reuse
    shutil.rmtree(cache)
    config = _config(tmp_path, cache, "dask")
    runner = task_runner_for(config)
    assert type(runner).__name__ == "DaskTaskRunner"
    scaled = merge_flow.with_options(task_runner=runner)(config)
    assert {n: e["sha256"] for n, e in scaled["experts"].items()} == {
        n: e["sha256"] for n, e in reference["experts"].items()}
    assert {m: r["sha256"] for m, r in scaled["merged"].items()} == {
        m: r["sha256"] for m, r in reference["merged"].items()}
    assert scaled["accuracy"] == reference["accuracy"]
    assert scaled["experts"] == reference["experts"]  # recomputed on the workers, not reused
    import json
    from pathlib import Path

    manifest = json.loads((Path(scaled["merged"]["ties"]["uri"]) / "mergeflow.json").read_text())  # two layer groups
    assert sorted(f for f in manifest["files"] if f.startswith("model-")) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def test_a_stop_quiets_the_local_clusters_teardown_tracebacks():
    """After a stop, the local cluster's teardown logs each closed worker connection at INFO with a traceback
    (distributed.batched); the stop raises that logger to WARNING so a Ctrl-C ends with the stop message only."""
    import logging

    from tasks.runners import _stop_dask_workers

    class Client:
        def run(self, *args):
            raise OSError("cluster already closed")

    class Runner:
        client = Client()

    logger = logging.getLogger("distributed.batched")
    previous = logger.level
    logger.setLevel(logging.INFO)
    try:
        _stop_dask_workers(Runner(), "SIGINT received", "run-1")
        assert not logger.isEnabledFor(logging.INFO) and logger.isEnabledFor(logging.WARNING)
    finally:
        logger.setLevel(previous)


def test_a_stop_reaches_each_worker_and_quiets_its_teardown(monkeypatch):
    """The stop runs on every worker: it requests the stop there and raises the loggers its teardown writes to (a
    heartbeat meeting the closing scheduler logs an ERROR with a traceback) above ERROR."""
    import logging

    from mergeflow import stopping
    from tasks import runners

    ran, stops = [], []

    class Client:
        def run(self, function, *args):
            ran.append(function)
            function(*args)  # as a worker would

    class Runner:
        client = Client()

    monkeypatch.setattr(stopping, "request_stop", lambda *args: stops.append(args))
    levels = {name: logging.getLogger(name).level for name in runners.WORKER_TEARDOWN_LOGGERS}
    try:
        runners._stop_dask_workers(Runner(), "SIGINT received", "run-1")
        assert stops == [("SIGINT received", "run-1")] and ran[0].__module__ == "tasks.runners"  # importable there
        assert not logging.getLogger("distributed.worker").isEnabledFor(logging.ERROR)
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
