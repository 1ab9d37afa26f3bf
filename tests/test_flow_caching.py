"""Stage caching by content digests: a rerun with unchanged inputs runs no stage's work again (fine-tuning, heads,
statistics, sparsify, sweep points, merges of every kind: data-free, data-aware, learned, and evaluations), and a
changed expert re-runs only what depends on it."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.slow

WORK = {"mergeflow.families.text.training": "finetune_encoder", "mergeflow.families.text.evaluation": "score_encoder",
        "mergeflow.merge": "merge_pool", "mergeflow.families.text.encoder": "text_classification_statistics",
        "mergeflow.heads": "fit_linear_probe", "mergeflow.stages.sweep": "sweep_weights"}


def _config(tmp_path, cache, expert=None):
    from mergeflow.config import RunConfig

    return RunConfig.model_validate({
        "name": "cached",
        "tasks": [{"name": "election", "expert": expert}, {"name": "rotten_tomatoes"}],
        "data": {"probe_per_class": 2, "train": 16, "validation": 4, "test": 16},
        "finetune": {"steps": 2, "batch_size": 4, "max_length": 16, "warmup_steps": 1},
        "evaluation": {"max_length": 16},
        "merges": [{"method": "task_arithmetic"}, {"method": "ties"}, {"method": "regmean"},
                   {"method": "adamerging", "params": {"granularity": "task", "steps": 2}},
                   {"method": "task_arithmetic", "sweep": {"scaling": [0.5, 1.0]}}],
        "tuning": {"max_examples": 4},
        "statistics": {"max_examples": 4, "max_length": 16},
        "storage": {"root": str(tmp_path / "store"), "cache_dir": str(cache)},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "cached"},
        "device": "cpu",
    })


def test_rerun_skips_finished_stages_and_a_changed_expert_reruns_its_dependents(tmp_path, tmp_path_factory,
                                                                                prefect_harness, monkeypatch):
    import importlib

    from flows.merge_flow import merge_flow

    calls: Counter[str] = Counter()
    for module_name, function in WORK.items():
        module = importlib.import_module(module_name)
        original = getattr(module, function)

        def counting(*args, _original=original, _name=function, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, function, counting)
    from mergeflow.methods import METHODS

    for method in METHODS.values():  # every method's global pass (sparsify; statistics reads; learning)
        def prepare(self, *args, _original=method.prepare, _name=f"prepare:{method.name}", **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(method, "prepare", prepare)
    cache = tmp_path_factory.mktemp("cache")

    first = merge_flow(_config(tmp_path, cache))
    # task_arithmetic's prepare: one sparsify (TA and TA-tuned share its empty state) + one per sweep point;
    # merge_pool: TIES, RegMean, AdaMerging; both TA merges are written from the sweep's cached update
    assert calls == Counter({"finetune_encoder": 2, "fit_linear_probe": 2, "text_classification_statistics": 2,
                             "merge_pool": 3, "sweep_weights": 2, "score_encoder": 12,
                             "prepare:task_arithmetic": 3, "prepare:ties": 1, "prepare:regmean": 1,
                             "prepare:adamerging": 1}), calls

    calls.clear()
    second = merge_flow(_config(tmp_path, cache))
    assert sum(calls.values()) == 0, calls
    assert second["merged"] == first["merged"] and second["accuracy"] == first["accuracy"]

    weights = load_file(first["experts"]["election"]["uri"])
    weights["encoder.layer.0.output.dense.weight"] += 1e-3 * torch.ones_like(weights["encoder.layer.0.output.dense.weight"])
    changed = tmp_path / "election-v2.safetensors"
    save_file(weights, str(changed), metadata={"format": "pt"})
    calls.clear()
    third = merge_flow(_config(tmp_path, cache, expert=str(changed)))
    # the changed expert's statistics, every merge and sweep point, and the evaluations of what changed (its
    # expert on test and validation, the merges, the sweep points); never the other expert, heads or pretrained
    assert calls == Counter({"text_classification_statistics": 1, "merge_pool": 3, "sweep_weights": 2,
                             "score_encoder": 9, "prepare:task_arithmetic": 3, "prepare:ties": 1,
                             "prepare:regmean": 1, "prepare:adamerging": 1}), calls
    assert third["experts"]["rotten_tomatoes"] == first["experts"]["rotten_tomatoes"]
    assert third["accuracy"]["pretrained"] == first["accuracy"]["pretrained"]
    assert third["merged"]["task_arithmetic"]["sha256"] != first["merged"]["task_arithmetic"]["sha256"]
