"""DOGE TA against its math (closed-form gradient, projection, lambda, mask) and against a straightforward
per-layer autograd implementation of algorithms.md 1.1 written here, independently of mergeflow's code."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from factories import make_experts, tiny_state_dict
from mergeflow.checkpoints import open_checkpoint
from mergeflow.errors import ConfigError
from mergeflow.checkpoints.reader import TensorInfo
from mergeflow.merge import merge_state_dicts
from mergeflow.task_vectors import shape_groups
from mergeflow.methods import build_method
from mergeflow.methods.doge_ta import (DogeObjective, optimise_delta, shared_subspace, task_coefficients)

LINEAR = ["encoder.layer.0.attn.in_proj_weight", "encoder.layer.0.attn.out_proj.weight",
          "encoder.layer.0.mlp.fc1.weight", "encoder.layer.0.mlp.fc2.weight"]


def _reference_doge(base, experts, keys, eta=0.07, divisor=6, keep=0.3, steps=400, lr=1e-4):
    """algorithms.md 1.1, one layer after another: autograd on the loss, g - P g, torch.optim.Adam."""
    n = len(experts)
    taus = {k: torch.stack([e[k].float() - base[k].float() for e in experts]) for k in keys}
    thresholds = []
    for i in range(n):
        flat = torch.cat([taus[k][i].reshape(-1) for k in sorted(keys)]).abs()
        thresholds.append(flat.kthvalue(flat.numel() - math.floor(keep * flat.numel())).values)
    out = dict(base)
    for k in keys:
        tau = taus[k]
        r = min(tau.shape[1:])
        lam = [eta / tau[i].norm() for i in range(n)]
        bases = [torch.linalg.svd(tau[i], full_matrices=False)[0][:, :r // n] for i in range(n)]
        q = torch.linalg.svd(torch.cat(bases, dim=1), full_matrices=False)[0][:, :r // divisor]
        projector = q @ q.T
        delta = torch.zeros_like(tau[0], requires_grad=True)
        adam = torch.optim.Adam([delta], lr=lr)
        for _ in range(steps):
            adam.zero_grad()
            merged = sum(lam[i] * (tau[i] + delta) for i in range(n))
            loss = sum(((tau[j] * (tau[j] - merged)).sum(dim=1) ** 2).sum() for j in range(n))
            loss.backward()
            with torch.no_grad():
                delta.grad -= projector @ delta.grad
            adam.step()
        delta = delta.detach()
        out[k] = base[k] + sum(lam[i] * (tau[i].abs() >= thresholds[i]) * (tau[i] + delta) for i in range(n))
    return out


def _relative(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture
def models():
    base = tiny_state_dict()
    return base, make_experts(base, 3)


def _stacked_model(seed=0):
    """Several layers of two shapes, so that grouping has something to batch."""
    g = torch.Generator().manual_seed(seed)
    base = {f"blocks.{i}.fc.weight": torch.randn(12, 6, generator=g) for i in range(4)}
    base |= {f"blocks.{i}.proj.weight": torch.randn(6, 12, generator=g) for i in range(2)}
    base["blocks.0.fc.bias"] = torch.randn(12, generator=g)
    experts = [{k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(4)]
    return base, experts


def test_closed_form_gradient_equals_autograd():
    g = torch.Generator().manual_seed(0)
    tvs = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    lam = torch.rand(2, 3, generator=g, dtype=torch.float64)
    delta = torch.randn(2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    merged = torch.einsum("gn,gnrc->grc", lam, tvs) + lam.sum(1).view(2, 1, 1) * delta
    loss = ((tvs * (tvs - merged.unsqueeze(1))).sum(-1) ** 2).sum()
    loss.backward()
    closed = DogeObjective(tvs, lam).gradient(delta.detach(), out=torch.empty_like(delta))
    assert torch.allclose(closed, delta.grad, rtol=1e-12, atol=1e-12 * float(delta.grad.abs().max()))


def test_shared_subspace_is_the_basis_of_the_recipe():
    tvs = torch.randn(3, 10, 7, generator=torch.Generator().manual_seed(1))
    q = shared_subspace(tvs, divisor=3)
    assert q.shape == (10, 7 // 3)
    assert torch.allclose(q.T @ q, torch.eye(2), atol=1e-5)
    bases = [torch.linalg.svd(t, full_matrices=False)[0][:, :7 // 3] for t in tvs]
    expected = torch.linalg.svd(torch.cat(bases, dim=1), full_matrices=False)[0][:, :2]
    assert torch.allclose(q @ q.T, expected @ expected.T, atol=1e-5)
    wide = shared_subspace(tvs.mT.contiguous(), divisor=3)  # a wide layer goes through its transpose's SVD
    bases = [torch.linalg.svd(t.T, full_matrices=False)[0][:, :7 // 3] for t in tvs]
    expected = torch.linalg.svd(torch.cat(bases, dim=1), full_matrices=False)[0][:, :2]
    assert wide.shape == (7, 2) and torch.allclose(wide @ wide.T, expected @ expected.T, atol=1e-5)


def test_shared_subspace_of_low_rank_task_vectors_is_finite_and_orthonormal():
    g = torch.Generator().manual_seed(4)
    low_rank = torch.stack([torch.randn(12, 1, generator=g) @ torch.randn(1, 6, generator=g) for _ in range(3)])
    for tvs in (low_rank, torch.zeros(3, 12, 6)):  # fewer nonzero singular values than floor(r/N) = 2
        q = shared_subspace(tvs, divisor=2)
        assert q.shape == (12, 3) and torch.allclose(q.T @ q, torch.eye(3), atol=1e-5)


def test_adam_receives_the_gradient_projected_off_the_subspace(monkeypatch):
    tvs = torch.randn(1, 3, 12, 6, generator=torch.Generator().manual_seed(2))
    basis = shared_subspace(tvs[0], divisor=2).unsqueeze(0)
    seen = []
    step = torch.optim.Adam.step

    def spying_step(self, *args, **kwargs):
        grad = self.param_groups[0]["params"][0].grad
        seen.append((float((basis.mT @ grad).norm()), float(grad.norm())))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spying_step)
    delta = optimise_delta(tvs, task_coefficients(tvs, 0.07), basis, steps=5, lr=1e-2)
    assert len(seen) == 5 and all(inside <= 1e-5 * total and total > 0 for inside, total in seen)
    # Adam rescales per coordinate after the projection, so delta itself leaves the complement (pitfall 4)
    assert float((basis.mT @ delta).norm()) > 1e-3 * float(delta.norm())


def test_lambda_is_per_task_per_layer(models):
    base, experts = models
    experts = [{k: base[k] + (1 + 9 * (k == LINEAR[0])) * (i + 1) * (v - base[k]) if v.is_floating_point() else v
                for k, v in e.items()} for i, e in enumerate(experts)]  # norms differ per task and per layer
    merged = merge_state_dicts("doge_ta", base, experts, {"steps": 0, "keep": 1.0, "eta": 0.1})
    for k in LINEAR:
        taus = [e[k] - base[k] for e in experts]
        assert torch.allclose(task_coefficients(torch.stack(taus), 0.1),
                              torch.tensor([0.1 / t.norm() for t in taus]))
        assert torch.allclose(merged[k], base[k] + sum(0.1 / t.norm() * t for t in taus), atol=1e-6)


def test_mask_comes_from_the_original_task_vectors():
    g = torch.Generator().manual_seed(3)
    base = {"layer.weight": torch.zeros(6, 5)}
    experts = [{"layer.weight": 0.05 * torch.randn(6, 5, generator=g)} for _ in range(2)]
    params = {"keep": 0.5, "lr": 0.05, "steps": 20, "eta": 0.1}
    merged = merge_state_dicts("doge_ta", base, experts, params)["layer.weight"]
    tvs = torch.stack([e["layer.weight"] for e in experts]).unsqueeze(0)
    lam = task_coefficients(tvs, 0.1)
    delta = optimise_delta(tvs, lam, shared_subspace(tvs[0], 6).unsqueeze(0), 20, 0.05)[0]
    state = build_method("doge_ta", params).prepare(_pool(base, experts))

    def merge(masks):
        return sum(lam[0, i] * masks[i] * (tvs[0, i] + delta) for i in range(2))

    original = [tvs[0, i].abs() >= state["thresholds"][i] for i in range(2)]
    shifted = [(tvs[0, i] + delta).abs() >= (tvs[0, i] + delta).abs().flatten().kthvalue(15).values
               for i in range(2)]
    assert any(not torch.equal(a, b) for a, b in zip(original, shifted))  # the case tells them apart
    assert torch.allclose(merged, merge(original), atol=1e-7)
    assert not torch.allclose(merged, merge(shifted), atol=1e-4)


def _pool(base, experts):
    from mergeflow.checkpoints import StateDictSource
    from mergeflow.task_vectors import ExpertPool

    return ExpertPool(StateDictSource(base, "base"), [StateDictSource(e, f"e{i}") for i, e in enumerate(experts)],
                      [f"e{i}" for i in range(len(experts))])


def test_thresholds_are_global_over_the_selected_layers_only(models):
    base, experts = models
    state = build_method("doge_ta").prepare(_pool(base, experts))
    assert state["selected"] == [k for k in base if k in LINEAR]
    for i, e in enumerate(experts):
        flat = torch.cat([(e[k] - base[k]).reshape(-1) for k in LINEAR]).abs()
        assert state["thresholds"][i] == float(flat.kthvalue(flat.numel() - int(0.3 * flat.numel())).values)


def test_matches_the_straightforward_reference_at_default_settings(models):
    base, experts = models
    got = merge_state_dicts("doge_ta", base, experts)
    expected = _reference_doge(base, experts, LINEAR)
    for k in LINEAR:
        assert _relative(got[k] - base[k], expected[k] - base[k]) <= 1e-4, k
    assert all(torch.equal(got[k], base[k]) for k in base if k not in LINEAR)


def test_grouped_layers_equal_one_layer_at_a_time():
    base, experts = _stacked_model()
    params = {"steps": 100, "lr": 1e-3}
    singles = merge_state_dicts("doge_ta", base, experts, {**params, "group_mb": 0})
    grouped = merge_state_dicts("doge_ta", base, experts, {**params, "group_mb": 1000})
    method = build_method("doge_ta", {**params, "group_mb": 1000})
    state = method.prepare(_pool(base, experts))
    assert method.grouping(state, torch.device("cpu")) == (list(base)[:6], 1000 * 10**6)
    assert build_method("doge_ta").grouping(state, torch.device("cpu"))[1] == 0
    assert build_method("doge_ta").grouping(state, torch.device("cuda"))[1] == 256 * 10**6
    weights = [k for k in base if k.endswith("weight")]
    assert all(_relative(grouped[k] - base[k], singles[k] - base[k]) <= 1e-6 for k in weights)
    assert torch.equal(grouped["blocks.0.fc.bias"], singles["blocks.0.fc.bias"])
    reference = _reference_doge(base, experts, weights, steps=100, lr=1e-3)
    assert all(_relative(grouped[k] - base[k], reference[k] - base[k]) <= 1e-4 for k in weights)


def test_engine_groups_equal_shapes_under_the_byte_cap():
    infos = [TensorInfo(f"t{i}", shape, torch.float32) for i, shape in enumerate([(4, 2), (2, 4), (4, 2), (4, 2)])]
    one_layer = 3 * 4 * 8  # fp32 task vectors of 3 experts
    names = [[info.name for info in group] for group in shape_groups(infos, 3, 2 * one_layer)]
    assert names == [["t0", "t2"], ["t3"], ["t1"]]
    assert [len(g) for g in shape_groups(infos, 3, 0)] == [1, 1, 1, 1]


def test_runs_are_deterministic(models):
    base, experts = models
    first = merge_state_dicts("doge_ta", base, experts, {"steps": 50})
    second = merge_state_dicts("doge_ta", base, experts, {"steps": 50})
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("policy,params", [("pretrained", {}), ("average", {}),
                                           ("task_arithmetic", {"unselected_scaling": 0.5})])
def test_unselected_policy(models, policy, params):
    base, experts = models
    got = merge_state_dicts("doge_ta", base, experts, {"steps": 10, "unselected": policy, **params})
    same_linear = merge_state_dicts("doge_ta", base, experts, {"steps": 10})
    for k, v in base.items():
        if k in LINEAR:
            assert torch.equal(got[k], same_linear[k])
        elif not v.is_floating_point():
            assert torch.equal(got[k], v)
        else:
            taus = torch.stack([e[k] - v for e in experts])
            expected = {"pretrained": v, "average": v + taus.mean(0), "task_arithmetic": v + 0.5 * taus.sum(0)}
            assert torch.allclose(got[k], expected[policy], atol=1e-6), k


def test_include_exclude_patterns(models):
    base, experts = models
    state = build_method("doge_ta", {"exclude": [r"fc2\."]}).prepare(_pool(base, experts))
    assert state["selected"] == [k for k in base if k in LINEAR and "fc2" not in k]
    got = merge_state_dicts("doge_ta", base, experts, {"steps": 5, "exclude": [r"fc2\."]})
    assert torch.equal(got["encoder.layer.0.mlp.fc2.weight"], base["encoder.layer.0.mlp.fc2.weight"])
    with pytest.raises(ConfigError, match="2-D"):
        build_method("doge_ta", {"include": ["fc1.bias"]}).prepare(_pool(base, experts))
    with pytest.raises(ConfigError, match="invalid parameter-selection pattern"):
        build_method("doge_ta", {"include": ["("]})


def test_cli_merge_end_to_end(tmp_path, model_files):
    base_path, expert_paths, base, experts = model_files
    exe = shutil.which("mergeflow", path=str(Path(sys.executable).parent)) or "mergeflow"
    args = [exe, "merge", "--method", "doge_ta", "--base", base_path, "--out", str(tmp_path / "out"),
            "--device", "cpu", "--param", "steps=60", "--param", "eta=0.15", "--param", "unselected=average"]
    for path in expert_paths:
        args += ["--expert", path]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    expected = merge_state_dicts("doge_ta", base, experts, {"steps": 60, "eta": 0.15, "unselected": "average"})
    ckpt = open_checkpoint(str(tmp_path / "out"))
    assert ckpt.metadata["merge_method"] == "doge_ta"
    for k in expected:
        assert torch.allclose(ckpt.get(k).float(), expected[k].float(), rtol=1e-6, atol=1e-7), k
