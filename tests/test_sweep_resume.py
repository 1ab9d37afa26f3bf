"""A point scored on more validation examples than its stored record keeps that record's credits and scores only
the examples after them (a search's deeper rung), with the same result as scoring them all; where the record
already covers the split, nothing is merged or scored (the real MiniLM and real texts, the in-process stage)."""

from __future__ import annotations

import json

import pytest

import mergeflow.stages.sweep as sweep_stage
from mergeflow.content_cache import ContentCache
from mergeflow.config import MergeDataConfig, MergeSpec, load_yaml_model
from mergeflow.stages.in_process import open_run
from mergeflow.stages.store import Store
from test_merge_data import inputs, validation_only  # noqa: F401  (fixtures)

SPEC = MergeSpec(method="task_arithmetic", params={"scaling": 0.8})
TASKS = ["election", "rotten_tomatoes"]


@pytest.fixture
def runs(inputs, validation_only, tmp_path):  # noqa: F811
    root, base, experts, _ = inputs
    config = load_yaml_model(str(root / "data.yaml"), MergeDataConfig)
    return [open_run(config, base, experts, Store(str(tmp_path / name), {}, ContentCache()), SPEC, "cpu")
            for name in ("s", "fresh")]


def test_a_deeper_rung_scores_only_the_examples_after_the_ones_it_kept(runs, monkeypatch, tmp_path):
    run, fresh_run = runs
    calls: list[tuple[list[str], int, int]] = []  # (tasks, max_examples, start) of each scoring
    merges: list[int] = []
    score_model, sweep_weights = sweep_stage.score_model, sweep_stage.sweep_weights

    def scoring(base, tasks, evaluation, store, device, split, max_examples, state_dict, start=0):
        calls.append((sorted(tasks), max_examples, start))
        return score_model(base, tasks, evaluation, store, device, split, max_examples, state_dict, start)

    monkeypatch.setattr(sweep_stage, "score_model", scoring)
    monkeypatch.setattr(sweep_stage, "sweep_weights", lambda *a: merges.append(1) or sweep_weights(*a))

    first = sweep_stage.score(SPEC, 2, run)
    resumed = sweep_stage.score(SPEC, 4, run, resume_from=2)
    assert calls == [(TASKS, 2, 0), (TASKS, 4, 2)]  # rung 1 scored examples 2 and 3 only
    assert all(resumed["correct"][t][:2] == first["correct"][t] and len(resumed["correct"][t]) == 4 for t in TASKS)
    fresh = sweep_stage.score(SPEC, 4, fresh_run)  # every example at once, in another store
    assert resumed == fresh  # the same credits, and accuracies to the bit
    records = [json.loads(p.read_text()) for p in (tmp_path / "s" / "sweeps").glob("*.json")]
    assert [r["correct"] for r in records if r.get("continued_from") == 2] == [fresh["correct"]]

    calls.clear(), merges.clear()
    whole = sweep_stage.score(SPEC, 12, run, resume_from=4)  # the split holds 4: nothing left to score
    assert calls == [] and merges == [] and whole == fresh
    assert sweep_stage.score(SPEC, 3, run, resume_from=1)["correct"] == {t: c[:3] for t, c in fresh["correct"].items()}
    assert calls[-1] == (TASKS, 3, 0)  # no record on 1 example: scored from the start
