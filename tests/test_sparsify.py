"""Top-k thresholds: the streaming radix select equals kthvalue on the concatenated vector."""

from __future__ import annotations

import pytest
import torch

from mergeflow.checkpoints import StateDictSource
from mergeflow.sparsify import global_topk_thresholds, topk_threshold
from mergeflow.task_vectors import ExpertPool


def _pool(base, experts):
    return ExpertPool(StateDictSource(base), [StateDictSource(e) for e in experts], [str(i) for i in range(len(experts))])


@pytest.mark.parametrize("density", [0.01, 0.2, 0.3, 0.77, 1.0])
def test_streaming_global_threshold_equals_dense_kthvalue(density):
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(50, 40, generator=g), "b": torch.randn(333, generator=g), "c": torch.randn(7, 3, 2, generator=g)}
    experts = []
    for i in range(3):
        e = {k: v + torch.randn(v.shape, generator=g) * (10.0 ** -i) for k, v in base.items()}
        e["b"][:5] = base["b"][:5]  # exact zeros in the task vector
        experts.append(e)
    got = global_topk_thresholds(_pool(base, experts), density)
    for i, e in enumerate(experts):
        flat = torch.cat([(e[k] - base[k]).reshape(-1) for k in base])
        assert got[i] == topk_threshold(flat, density)


def test_threshold_with_heavy_ties_and_tiny_values():
    base = {"a": torch.zeros(1000)}
    tv = torch.zeros(1000)
    tv[:400] = 1e-30
    tv[400:] = 2.5
    got = global_topk_thresholds(_pool(base, [{"a": tv}]), 0.5)
    assert got == [topk_threshold(tv, 0.5)] == [2.5]


def test_topk_threshold_keeps_floor_kd_plus_one():
    values = torch.arange(1.0, 101.0)
    assert int((values.abs() >= topk_threshold(values, 0.3)).sum()) == 31
