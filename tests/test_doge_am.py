"""DOGE AM against a straightforward per-layer autograd implementation of algorithms.md 1.2 written here
(per-task deltas, r/N subspace, masks of the original vectors), composed with the (separately tested) AdaMerging
learner; and the method's contract: objective required, the coefficients replace lambda, cached states."""

from __future__ import annotations

import math

import pytest
import torch

from factories import make_experts, tiny_state_dict
from mergeflow.coefficients import learn_coefficients
from mergeflow.checkpoints import StateDictSource
from mergeflow.errors import ConfigError
from mergeflow.merge import merge_pool, merge_state_dicts
from mergeflow.methods import build_method
from mergeflow.methods.doge_am import ADJUSTED, DogeAM, optimise_task_deltas
from mergeflow.methods.doge_ta import DogeObjective, shared_subspace, task_coefficients
from mergeflow.task_vectors import ExpertPool

LINEAR = ["encoder.layer.0.attn.in_proj_weight", "encoder.layer.0.attn.out_proj.weight",
          "encoder.layer.0.mlp.fc1.weight", "encoder.layer.0.mlp.fc2.weight"]


def _reference_adjusted(base, experts, keys, eta=0.07, keep=0.3, steps=400, lr=1e-4):
    """algorithms.md 1.2: per layer, one delta per task, autograd on the loss, g_i - P g_i, one Adam."""
    n = len(experts)
    taus = {k: torch.stack([e[k].float() - base[k].float() for e in experts]) for k in keys}
    thresholds = []
    for i in range(n):
        flat = torch.cat([taus[k][i].reshape(-1) for k in sorted(keys)]).abs()
        thresholds.append(flat.kthvalue(flat.numel() - math.floor(keep * flat.numel())).values)
    adjusted = {}
    for k in keys:
        tau = taus[k]
        r = min(tau.shape[1:])
        lam = torch.stack([eta / tau[i].norm() for i in range(n)])
        bases = [torch.linalg.svd(tau[i], full_matrices=False)[0][:, :r // n] for i in range(n)]
        q = torch.linalg.svd(torch.cat(bases, dim=1), full_matrices=False)[0][:, :r // n]
        projector = q @ q.T
        deltas = [torch.zeros_like(tau[0], requires_grad=True) for _ in range(n)]
        adam = torch.optim.Adam(deltas, lr=lr)
        for _ in range(steps):
            adam.zero_grad()
            merged = sum(lam[i] * (tau[i] + deltas[i]) for i in range(n))
            loss = sum(((tau[j] * (tau[j] - merged)).sum(dim=1) ** 2).sum() for j in range(n))
            loss.backward()
            with torch.no_grad():
                for delta in deltas:
                    delta.grad -= projector @ delta.grad
            adam.step()
        adjusted[k] = torch.stack([(tau[i].abs() >= thresholds[i]) * (tau[i] + deltas[i].detach()) for i in range(n)])
    return adjusted


def _towards(target):
    def objective(merged, step):
        return sum(((merged[k] - target[k]) ** 2).sum() for k in merged)
    return objective


@pytest.fixture
def models():
    base = tiny_state_dict()
    return base, make_experts(base, 3)


def test_per_task_gradient_is_lambda_share_of_the_shared_one():
    g = torch.Generator().manual_seed(0)
    tvs = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    lam = torch.rand(2, 3, generator=g, dtype=torch.float64) + 0.1
    deltas = (0.1 * torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)).requires_grad_()
    merged = torch.einsum("gn,gnrc->grc", lam, tvs + deltas)
    loss = sum(((tvs[:, j] * (tvs[:, j] - merged)).sum(dim=-1) ** 2).sum() for j in range(3))
    loss.backward()
    total = lam.sum(dim=1)
    shared = torch.einsum("gn,gnrc->grc", lam, deltas.detach()) / total[:, None, None]
    grad = DogeObjective(tvs, lam).gradient(shared, out=torch.empty_like(shared))
    expected = grad[:, None] * (lam / total[:, None])[:, :, None, None]
    torch.testing.assert_close(deltas.grad, expected, rtol=1e-10, atol=1e-12)


def test_adjusted_vectors_match_the_straightforward_reference(models):
    base, experts = models
    reference = _reference_adjusted(base, experts, LINEAR, steps=60, lr=1e-3)
    pool = ExpertPool(StateDictSource(base, "base"), [StateDictSource(e, f"e{i}") for i, e in enumerate(experts)],
                      ["e0", "e1", "e2"], objective=_towards({k: experts[0][k] for k in LINEAR}))
    method = DogeAM(DogeAM.Params(steps=60, lr=1e-3, am_steps=1))
    adjusted = method.prepare(pool)[ADJUSTED]
    for k in LINEAR:
        ref = reference[k]
        assert float((adjusted[k] - ref).norm() / ref.norm()) < 1e-5, k
        assert not torch.equal(adjusted[k], (ref != 0) * torch.stack([e[k] - base[k] for e in experts]))


def test_deltas_start_at_zero_and_coincide_across_tasks():
    """Task i's gradient is lambda_i / Lambda times a shared one, and Adam is invariant to a constant gradient
    scale: the reference's per-task deltas agree up to Adam's eps (a property of the recipe, kept)."""
    g = torch.Generator().manual_seed(3)
    tvs = torch.randn(1, 3, 12, 6, generator=g)
    lam = task_coefficients(tvs, 0.07)
    basis = shared_subspace(tvs[0], 3)[None]
    assert basis.shape == (1, 12, 2)
    assert torch.count_nonzero(optimise_task_deltas(tvs, lam, basis, 0, 1e-3)) == 0
    deltas = optimise_task_deltas(tvs, lam, basis, 20, 1e-3)
    assert deltas.abs().max() > 0.01
    torch.testing.assert_close(deltas[0, 0], deltas[0, 1], rtol=1e-3, atol=1e-6)


def test_merge_uses_learned_coefficients_not_lambda(models):
    base, experts = models
    target = {k: experts[0][k] for k in LINEAR}
    reference = _reference_adjusted(base, experts, LINEAR, steps=30, lr=1e-3)
    objective = _towards(target)
    merged = merge_state_dicts("doge_am", base, experts, {"steps": 30, "lr": 1e-3, "am_steps": 40, "am_lr": 0.05},
                               objective=objective)
    learned = learn_coefficients({k: base[k] for k in LINEAR}, reference, objective, init=0.3, lr=0.05, steps=40)
    for k in LINEAR:
        w = torch.tensor(learned.coefficients[k])
        expected = base[k] + torch.tensordot(w, reference[k], dims=1)
        torch.testing.assert_close(merged[k], expected, atol=1e-5, rtol=1e-4)
    assert learned.losses[-1] < learned.losses[0]
    for k in base:  # unselected tensors stay pretrained (the reference's policy)
        if k not in LINEAR:
            assert torch.equal(merged[k], base[k]), k
    averaged = merge_state_dicts("doge_am", base, experts, {"steps": 2, "am_steps": 1, "unselected": "average"},
                                 objective=objective)
    torch.testing.assert_close(averaged["encoder.layer.0.ln_1.weight"],
                               sum(e["encoder.layer.0.ln_1.weight"] for e in experts) / 3)


def test_state_from_elsewhere_recomputes_the_same_merge(models):
    base, experts = models
    pool = ExpertPool(StateDictSource(base, "base"), [StateDictSource(e, f"e{i}") for i, e in enumerate(experts)],
                      ["e0", "e1", "e2"], objective=_towards({k: experts[1][k] for k in LINEAR}))
    params = DogeAM.Params(steps=25, lr=1e-3, am_steps=10, am_lr=0.05)
    first: dict[str, torch.Tensor] = {}
    state = merge_pool(DogeAM(params), pool, first.__setitem__)
    again: dict[str, torch.Tensor] = {}
    merge_pool(DogeAM(params), pool, again.__setitem__, state=state)  # fresh method: no adjusted vectors kept
    for k in base:
        torch.testing.assert_close(again[k], first[k], atol=1e-6, rtol=1e-6)


def test_needs_an_objective_and_linear_weights(models):
    base, experts = models
    sources = [StateDictSource(e, f"e{i}") for i, e in enumerate(experts)]
    with pytest.raises(ConfigError, match="objective"):
        DogeAM().prepare(ExpertPool(StateDictSource(base, "base"), sources, ["a", "b", "c"]))
    pool = ExpertPool(StateDictSource(base, "base"), sources, ["a", "b", "c"], objective=_towards({}))
    with pytest.raises(ConfigError, match="no 2-D linear weight"):
        build_method("doge_am", {"exclude": [".*"]}).prepare(pool)
    with pytest.raises(ConfigError, match="2-D weights only"):
        build_method("doge_am", {"include": ["ln_1"]}).prepare(pool)
    assert DogeAM.needs_objective and not build_method("doge_ta").needs_objective
