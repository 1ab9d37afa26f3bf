"""Warm starts: an iterative method run with fewer steps keeps its solver states, and a run with more continues from
them, bit-identical to running every step at once (WUDI's and DOGE TA's Adam, MaTS's conjugate gradient,
AdaMerging's and DOGE AM's coefficient fits)."""

from __future__ import annotations

import pytest
import torch

from factories import make_experts, random_statistics, tiny_state_dict
from mergeflow.coefficients import learn_coefficients
from mergeflow.merge import merge_state_dicts
from mergeflow.methods.doge_ta import optimise_delta, shared_subspace, task_coefficients
from mergeflow.methods.wudi import wudi_autograd, wudi_gram
from mergeflow.solvers import conjugate_gradient
from mergeflow.warm_start import Resume, WarmStarts


@pytest.fixture
def steps_run(monkeypatch):
    """How many times the solvers' loops asked whether to stop (once per step or iteration), reset by `clear()`."""
    import mergeflow.stopping as stopping

    calls, check = [], stopping.check
    monkeypatch.setattr(stopping, "check", lambda: (calls.append(1), check())[1])
    return calls


def _tvs(seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 12, 8, generator=torch.Generator().manual_seed(seed)) * 1e-2


@pytest.mark.parametrize("solve", [wudi_gram, wudi_autograd])
def test_wudi_continued_from_fewer_steps_is_the_whole_run(tmp_path, solve, steps_run):
    tvs = _tvs()
    whole = solve(tvs, 30, 1e-3)
    resume = Resume(WarmStarts(tmp_path), ("layer",))
    early = solve(tvs, 8, 1e-3, resume)
    assert not torch.equal(early, whole)
    steps_run.clear()
    assert torch.equal(solve(tvs, 30, 1e-3, resume), whole)
    assert len(steps_run) == 22  # the steps left after the 8 kept
    assert sorted(p.name for p in (tmp_path).rglob("*.safetensors")) == ["000000008.safetensors",
                                                                        "000000030.safetensors"]
    assert torch.equal(solve(tvs, 20, 1e-3, resume), solve(tvs, 20, 1e-3))  # from 8, not from 30


def test_doge_delta_continued_from_fewer_steps_is_the_whole_run(tmp_path, steps_run):
    tvs = _tvs(1)
    lam = task_coefficients(tvs[None], 0.07)
    basis = shared_subspace(tvs, 4)[None]
    whole = optimise_delta(tvs[None], lam, basis, 25, 1e-2)
    resume = Resume(WarmStarts(tmp_path), ("a", "b"))
    optimise_delta(tvs[None], lam, basis, 6, 1e-2, resume)
    steps_run.clear()
    assert torch.equal(optimise_delta(tvs[None], lam, basis, 25, 1e-2, resume), whole)
    assert len(steps_run) == 19


def test_cg_continued_from_fewer_iterations_is_the_whole_run(tmp_path, steps_run):
    g = torch.Generator().manual_seed(2)
    a = torch.randn(4, 10, 10, generator=g, dtype=torch.float64)
    m = a @ a.mT + 0.1 * torch.eye(10, dtype=torch.float64)
    b = torch.randn(4, 10, generator=g, dtype=torch.float64)

    def matvec(v):
        return (m @ v.unsqueeze(-1)).squeeze(-1)

    whole = conjugate_gradient(matvec, b, max_iter=9, tol=1e-12, dtype=torch.float64)
    resume = Resume(WarmStarts(tmp_path), ("w",))
    early = conjugate_gradient(matvec, b, max_iter=3, tol=1e-12, dtype=torch.float64, resume=resume)
    assert early.iterations.tolist() == [3] * 4
    steps_run.clear()
    again = conjugate_gradient(matvec, b, max_iter=9, tol=1e-12, dtype=torch.float64, resume=resume)
    assert len(steps_run) == 6
    for field in ("x", "iterations", "residual", "converged"):
        assert torch.equal(getattr(again, field), getattr(whole, field)), field


def test_a_state_is_kept_only_when_asked_and_written_whole(tmp_path):
    store = WarmStarts(tmp_path / "w", keep=False)
    store.save(["x"], 5, {"param": torch.ones(2)})
    assert store.latest(["x"], 10) is None and not (tmp_path / "w").exists()
    store = WarmStarts(tmp_path / "w")
    store.save(["x"], 5, {"param": torch.ones(2)})
    store.save(["x"], 5, {"param": torch.zeros(2)})  # a state already kept stays
    steps, state = store.latest(["x"], 10)
    assert steps == 5 and torch.equal(state["param"], torch.ones(2))
    assert store.latest(["x"], 4) is None and store.latest(["y"], 10) is None
    assert not [p for p in (tmp_path / "w").rglob("*") if ".partial-" in p.name]


@pytest.mark.parametrize("method, counts, params, data", [
    ("wudi", "steps", {"scaling": 1.5}, False),
    ("doge_ta", "steps", {"eta": 0.07}, False),
    ("mats", "max_iter", {"objective": "kfac"}, True),
])
def test_a_merge_continued_through_the_pool_is_the_plain_merge(tmp_path, method, counts, params, data, steps_run):
    """The engine hands the pool's warm starts to the method: the reduced merge keeps its states, the full one
    continues from them, and its tensors are the plain full merge's, bit for bit."""
    base = tiny_state_dict()
    experts = make_experts(base, 3)
    stats = random_statistics(base, 3) if data else None
    full = {**params, counts: 12}
    steps_run.clear()
    plain = merge_state_dicts(method, base, experts, full, statistics=stats)
    plain_steps = len(steps_run)
    merge_state_dicts(method, base, experts, {**params, counts: 3}, statistics=stats, warm=WarmStarts(tmp_path))
    assert list(tmp_path.rglob("000000003.safetensors"))
    steps_run.clear()
    continued = merge_state_dicts(method, base, experts, full, statistics=stats,
                                  warm=WarmStarts(tmp_path, keep=False))
    solves = len(list(tmp_path.iterdir()))  # one kept state per layer (or same-shape group) solved
    assert solves and len(steps_run) == plain_steps - 3 * solves
    assert not list(tmp_path.rglob("000000012.safetensors"))
    assert continued.keys() == plain.keys()
    for name in plain:
        assert torch.equal(continued[name], plain[name]), name


OBJECTIVE_STEPS: list[int] = []


def _noisy_objective(merged, step):
    """A loss that changes with the step and draws from torch's RNG: continuing needs both carried over."""
    OBJECTIVE_STEPS.append(step)
    return sum(((t - 0.01 * (step % 3)) ** 2).mean() for t in merged.values()) * (1 + torch.rand(()))


def test_adamerging_continued_from_fewer_steps_is_the_whole_fit(tmp_path):
    base = {k: v for k, v in tiny_state_dict().items() if v.is_floating_point()}
    experts = make_experts(tiny_state_dict(), 3)
    tvs = {k: torch.stack([e[k] - v for e in experts]) for k, v in base.items()}
    whole = learn_coefficients(base, tvs, _noisy_objective, steps=9, lr=1e-2, seed=3)
    resume = Resume(WarmStarts(tmp_path), ("coefficients",))
    early = learn_coefficients(base, tvs, _noisy_objective, steps=4, lr=1e-2, seed=3, resume=resume)
    assert early.coefficients != whole.coefficients and early.losses == whole.losses[:4]
    OBJECTIVE_STEPS.clear()
    again = learn_coefficients(base, tvs, _noisy_objective, steps=9, lr=1e-2, seed=3, resume=resume)
    assert OBJECTIVE_STEPS == [4, 5, 6, 7, 8]  # the steps left after the 4 kept
    assert again.coefficients == whole.coefficients and again.losses == whole.losses
    state = torch.get_rng_state()
    learn_coefficients(base, tvs, _noisy_objective, steps=9, lr=1e-2, seed=3, resume=resume)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left as it was


@pytest.mark.parametrize("method, counts, params", [("adamerging", "steps", {}), ("doge_am", "am_steps", {"steps": 4})])
def test_a_learned_merge_continued_through_the_pool_is_the_plain_merge(tmp_path, method, counts, params):
    base = tiny_state_dict()
    experts = make_experts(base, 3)
    plain = merge_state_dicts(method, base, experts, {**params, counts: 8}, objective=_noisy_objective)
    merge_state_dicts(method, base, experts, {**params, counts: 3}, objective=_noisy_objective,
                      warm=WarmStarts(tmp_path))
    OBJECTIVE_STEPS.clear()
    continued = merge_state_dicts(method, base, experts, {**params, counts: 8}, objective=_noisy_objective,
                                  warm=WarmStarts(tmp_path, keep=False))
    assert OBJECTIVE_STEPS == [3, 4, 5, 6, 7] and continued.keys() == plain.keys()
    for name in plain:
        assert torch.equal(continued[name], plain[name]), name


def test_wudi_gram_solves_a_few_rows_at_a_time_and_continues_across_blocks(tmp_path, monkeypatch, steps_run):
    """Rows are independent problems (each reads only itself and G): blocks of 5 rows give the one-block solve (up
    to rounding of the products), and a continued run over blocks is the whole run over blocks, bit for bit."""
    import mergeflow.methods.wudi as wudi

    tvs = _tvs(1)  # [3, 12, 8]: blocks of 5, 5 and 2 rows
    one_block = wudi_gram(tvs, 30, 1e-3)
    monkeypatch.setattr(wudi, "ROWS", 5)
    steps_run.clear()
    blocks = wudi_gram(tvs, 30, 1e-3)
    assert len(steps_run) == 3 * 30
    torch.testing.assert_close(blocks, one_block, rtol=1e-6, atol=1e-9)
    assert not torch.equal(blocks, tvs.sum(0))
    resume = Resume(WarmStarts(tmp_path), ("layer",))
    wudi_gram(tvs, 8, 1e-3, resume)
    steps_run.clear()
    assert torch.equal(wudi_gram(tvs, 30, 1e-3, resume), blocks) and len(steps_run) == 3 * 22
    monkeypatch.setattr(wudi, "ROWS", 2048)  # a state kept over blocks continues in one block too
    torch.testing.assert_close(wudi_gram(tvs, 30, 1e-3, resume), one_block, rtol=1e-6, atol=1e-9)
