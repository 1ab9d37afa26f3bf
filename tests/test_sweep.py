"""Sweeps in the library: rescaling a shared update equals a fresh merge bit for bit, grids are validated
products, the rule and its tie-break, and the plot."""

from __future__ import annotations

import math

import pytest
import torch

from factories import make_experts, tiny_state_dict
from mergeflow.checkpoints import StateDictSource
from mergeflow.config import MergeSpec
from mergeflow.errors import ConfigError
from mergeflow.merge import merge_state_dicts
from mergeflow.sweep import (apply_update, choose, default_grid, grid_points, plot_sweep, scaled_update,
                             score_point)
from mergeflow.task_vectors import ExpertPool


@pytest.mark.parametrize("method,params", [("task_arithmetic", {}), ("ties", {"density": 0.3}),
                                           ("ties", {"density": 0.5, "merge": "mean"}),
                                           ("dare", {"drop_rate": 0.4, "seed": 3})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rescaled_update_equals_a_fresh_merge_bit_for_bit(method, params, dtype):
    base = tiny_state_dict(dtype=dtype)
    experts = make_experts(base, 3)
    pool = ExpertPool(StateDictSource(base), [StateDictSource(e) for e in experts], ["a", "b", "c"])
    update = dict(scaled_update(method, {**params, "scaling": 0.9}, pool))  # the scaling given is ignored
    for scaling in (0.1, 0.37, 1.0, 2.5):
        fresh = merge_state_dicts(method, base, experts, {**params, "scaling": scaling})
        rescaled = apply_update(base, update, scaling)
        for name in base:
            assert rescaled[name].dtype == fresh[name].dtype and torch.equal(rescaled[name], fresh[name]), name


def test_methods_without_a_scaling_coefficient_are_refused():
    base = tiny_state_dict()
    pool = ExpertPool(StateDictSource(base), [StateDictSource(e) for e in make_experts(base, 2)], ["a", "b"])
    with pytest.raises(ConfigError, match="no scaling-only coefficient"):
        scaled_update("doge_ta", {}, pool)


def test_grid_points_are_validated_products():
    points = grid_points("ties", {"density": [0.5, 0.1], "scaling": [1.0, 0.3]}, {"merge": "mean"})
    assert points == [{"merge": "mean", "density": d, "scaling": s} for d in (0.1, 0.5) for s in (0.3, 1.0)]
    with pytest.raises(ConfigError, match="scaling"):
        grid_points("task_arithmetic", {"scaling": [0.1, 11.0]})
    with pytest.raises(ConfigError, match="both fixed"):
        grid_points("task_arithmetic", {"scaling": [0.1]}, {"scaling": 0.3})
    with pytest.raises(ConfigError, match="at least one value"):
        grid_points("task_arithmetic", {"scaling": []})
    with pytest.raises(ConfigError, match="no default sweep grid"):
        default_grid("regmean")
    assert len(MergeSpec(method="task_arithmetic", sweep="default").grid_points()) == 10
    with pytest.raises(ValueError, match="lamda"):
        MergeSpec(method="task_arithmetic", sweep={"lamda": [0.1]})


def test_rule_and_tie_break():
    experts = {"a": 0.8, "b": 0.5}
    low = score_point({"scaling": 0.3}, {"a": 0.8, "b": 0.25}, experts)
    high = score_point({"scaling": 0.9}, {"a": 0.4, "b": 0.5}, experts)
    assert low.norm_avg == pytest.approx(0.75) and high.norm_avg == pytest.approx(0.75)
    assert choose([high, low], ["scaling"]) is low  # equal scores: the smaller coefficient
    by_acc = [score_point(p.params, p.accuracy, experts, "acc.avg") for p in (low, high)]
    assert choose(by_acc, ["scaling"]).params == {"scaling": 0.3}  # 0.525 vs 0.45
    even = score_point({"scaling": 0.9}, {"a": 0.56, "b": 0.35}, experts)  # 0.7 on both tasks: below low's 0.75
    floored = [score_point(p.params, p.accuracy, experts, "floor", floor=0.6) for p in (low, even)]
    assert floored[0].score == -math.inf and choose(floored, ["scaling"]).params == {"scaling": 0.9}
    assert choose([low, even], ["scaling"]) is low


def test_plot_has_a_line_per_task_and_the_average(tmp_path):
    experts = {"a": 0.8, "b": 0.5}
    points = [score_point({"scaling": s}, {"a": 0.5 + s / 4, "b": 0.4}, experts) for s in (0.1, 0.5, 1.0)]
    path = plot_sweep(points, ["scaling"], tmp_path / "sweep.png", "ta")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
