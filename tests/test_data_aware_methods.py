"""Fisher merging, RegMean and MaTS against dense formulas written here, statistics through files, the CLI and
clear errors."""

from __future__ import annotations

import pytest
import torch

from factories import make_experts, random_statistics, tiny_state_dict, write_statistics
from mergeflow.checkpoints import StateDictSource, open_checkpoint
from mergeflow_app.cli import main
from mergeflow.errors import CheckpointError, ConfigError
from mergeflow.merge import merge_checkpoints, merge_state_dicts
from mergeflow.methods import build_method
from mergeflow.methods.base import recorded
from mergeflow.methods.mats import SOLVES, solve_linear
from mergeflow.task_vectors import ExpertPool

FC1 = "encoder.layer.0.mlp.fc1.weight"


@pytest.fixture
def models():
    base = tiny_state_dict()
    experts = make_experts(base, 3)
    return base, experts, random_statistics(base, 3)


def _average(base, experts, name):
    return torch.stack([e[name].double() for e in experts]).mean(0)


def _shrink(g, ratio):
    return ratio * g + (1 - ratio) * torch.diag(torch.diagonal(g))


def _dense_regmean(experts, stats, name, ratio):
    grams = [_shrink(s[f"{name}::gram_in"].double(), ratio) for s in stats]
    rhs = sum(g @ e[name].double().T for g, e in zip(grams, experts))
    return (torch.linalg.inv(sum(grams)) @ rhs).T


def _check(got, want, atol=1e-5):
    assert torch.allclose(got.double(), want.double(), atol=atol, rtol=0), (got - want).abs().max()


@pytest.mark.parametrize("normalize", [True, False])
def test_fisher_matches_the_dense_formula(models, normalize):
    base, experts, stats = models
    eps = 1e-6
    got = merge_state_dicts("fisher", base, experts, {"normalize_fisher_weight": normalize}, statistics=stats)
    keys = [k for k, v in base.items() if v.is_floating_point()]
    norms = [sum(s[f"{k}::fisher"].double().square().sum() for k in keys).sqrt() for s in stats]
    inverse = [1 / (n + eps) for n in norms]
    coef = [w / sum(inverse) if normalize else 1.0 for w in inverse]
    for k in keys:
        weights = [c * (s[f"{k}::fisher"].double() + eps) for c, s in zip(coef, stats)]
        _check(got[k], sum(w * e[k].double() for w, e in zip(weights, experts)) / sum(weights))
    assert torch.equal(got["embeddings.position_ids"], base["embeddings.position_ids"])


def test_fisher_averages_parameters_without_fisher_and_zero_fisher_coordinates(models):
    base, experts, stats = models
    only_fc1 = [{f"{FC1}::fisher": s[f"{FC1}::fisher"] * torch.tensor([0.0] * 8 + [1.0] * 120).reshape(16, 8)}
                for s in stats]
    # without the per-model weights, eps / sum(eps) is the plain average (with them, a weighted one)
    got = merge_state_dicts("fisher", base, experts, {"normalize_fisher_weight": False}, statistics=only_fc1)
    bias = "encoder.layer.0.mlp.fc1.bias"
    _check(got[bias], _average(base, experts, bias))
    _check(got[FC1][0], _average(base, experts, FC1)[0])  # first row: zero Fisher everywhere -> average


@pytest.mark.parametrize("ratio", [0.95, 1.0])
def test_regmean_matches_the_dense_formula(models, ratio):
    base, experts, stats = models
    got = merge_state_dicts("regmean", base, experts, {"reduce_non_diagonal_ratio": ratio}, statistics=stats)
    for k, v in base.items():
        if not v.is_floating_point():
            continue
        want = _dense_regmean(experts, stats, k, ratio) if v.dim() == 2 else _average(base, experts, k)
        _check(got[k], want)


def test_regmean_input_dimensions_without_data_take_the_average(models):
    base, experts, stats = models
    cut = [{f"{FC1}::gram_in": s[f"{FC1}::gram_in"] * (torch.arange(8) != 2).float().outer(
        (torch.arange(8) != 2).float())} for s in stats]
    got = merge_state_dicts("regmean", base, experts, statistics=cut)
    _check(got[FC1][:, 2], _average(base, experts, FC1)[:, 2])
    assert torch.isfinite(got[FC1]).all()


@pytest.mark.parametrize("ratio", [1.0, 0.6])
def test_mats_regmean_objective_converges_to_the_closed_form(models, ratio):
    base, experts, stats = models
    params = {"objective": "regmean", "model_lambda": ratio, "tol": 1e-10, "max_iter": 500, "precision": "float64"}
    got = merge_state_dicts("mats", base, experts, params, statistics=stats)
    for k, v in base.items():
        if v.is_floating_point():
            want = _dense_regmean(experts, stats, k, ratio) if v.dim() == 2 else _average(base, experts, k)
            _check(got[k], want)


def test_mats_fisher_diag_converges_to_fisher_merging_and_averages_zero_fisher(models):
    base, experts, stats = models
    stats = [{**s, f"{FC1}::fisher": s[f"{FC1}::fisher"] * (torch.arange(8) != 5)} for s in stats]
    params = {"objective": "fisher_diag", "tol": 1e-10, "max_iter": 1000, "precision": "float64"}
    got = merge_state_dicts("mats", base, experts, params, statistics=stats)
    for k, v in base.items():
        if v.is_floating_point():
            fishers = [s[f"{k}::fisher"].double() for s in stats]
            total = sum(fishers)
            want = torch.where(total > 0, sum(f * e[k].double() for f, e in zip(fishers, experts)) / total,
                               _average(base, experts, k))
            _check(got[k], want)


def test_mats_kfac_solves_the_block_system(models):
    base, experts, stats = models
    for precision, tol in [("float64", 1e-6), ("float32", 1e-5)]:
        params = {"objective": "kfac", "tol": tol, "max_iter": 1000, "precision": precision}
        got = merge_state_dicts("mats", base, experts, params, statistics=stats)
        for k, v in base.items():
            if v.dim() != 2 or not v.is_floating_point():
                continue
            a = [s[f"{k}::gram_in"].double() for s in stats]
            g = [s[f"{k}::gram_out"].double() for s in stats]
            b = sum(ai @ e[k].double().T @ gi for ai, gi, e in zip(a, g, experts))
            x = got[k].double().T
            residual = (sum(ai @ x @ gi for ai, gi in zip(a, g)) - b).norm() / b.norm()
            assert residual <= tol, (k, precision, float(residual))


def test_mats_kfac_with_identity_output_grams_is_regmean(models):
    base, experts, stats = models
    eye = [{**s, **{k: torch.eye(t.shape[0]) for k, t in s.items() if k.endswith("::gram_out")}} for s in stats]
    got = merge_state_dicts("mats", base, experts, {"tol": 1e-10, "max_iter": 500, "precision": "float64"},
                            statistics=eye)
    _check(got[FC1], _dense_regmean(experts, stats, FC1, 1.0))


@pytest.mark.parametrize("init,expected", [("task_arithmetic", "ta"), ("average", "avg"), ("pretrained", "base")])
def test_mats_starts_from_the_initialisation(models, init, expected):
    base, experts, stats = models
    got = merge_state_dicts("mats", base, experts, {"init": init, "init_scaling": 0.4, "tol": 10.0},
                            statistics=stats)  # a tolerance met at the start: no iteration
    starts = {"ta": base[FC1] + 0.4 * sum(e[FC1] - base[FC1] for e in experts),
              "avg": _average(base, experts, FC1), "base": base[FC1]}
    _check(got[FC1], starts[expected], atol=1e-6)


def test_mats_solver_batches_layers_like_separate_solves(models):
    _, experts, stats = models
    g = torch.Generator().manual_seed(0)
    thetas = torch.stack([torch.stack([e[FC1] for e in experts]),
                          torch.stack([e[FC1] + torch.randn(16, 8, generator=g) for e in experts])]).double()
    a = torch.stack([torch.stack([s[f"{FC1}::gram_in"] for s in stats])] * 2).double()
    out = torch.stack([torch.stack([s[f"{FC1}::gram_out"] for s in stats])] * 2).double()
    x0 = thetas.mean(1)
    cg = {"max_iter": 300, "tol": 1e-10, "dtype": torch.float64}
    batched, result = solve_linear(thetas, a, out, x0, **cg)
    for layer in range(2):
        alone, single = solve_linear(thetas[layer:layer + 1], a[layer:layer + 1], out[layer:layer + 1],
                                     x0[layer:layer + 1], **cg)
        _check(batched[layer], alone[0], atol=1e-8)
        assert int(result.iterations[layer]) == int(single.iterations[0])
    assert bool(result.converged.all())


@pytest.mark.parametrize("objective", ["kfac", "regmean", "fisher_diag"])
def test_mats_engine_groups_equal_shapes_like_one_at_a_time(objective):
    g = torch.Generator().manual_seed(4)
    base = {f"blocks.{i}.fc.weight": torch.randn(12, 6, generator=g) for i in range(4)}
    base |= {f"blocks.{i}.proj.weight": torch.randn(6, 12, generator=g) for i in range(3)}
    experts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    stats = random_statistics(base, 3)
    common = {"objective": objective, "max_iter": 7, "precision": "float64"}  # capped: identical iterates
    alone = merge_state_dicts("mats", base, experts, {**common, "group_mb": 0}, statistics=stats)
    method = build_method("mats", {**common, "group_mb": 1})
    pool = ExpertPool(StateDictSource(base), [StateDictSource(e) for e in experts], ["a", "b", "c"],
                      statistics=[StateDictSource(s) for s in stats])
    grouped: dict[str, torch.Tensor] = {}
    from mergeflow.merge import merge_pool

    state = merge_pool(method, pool, grouped.__setitem__)
    for k in base:
        _check(grouped[k], alone[k], atol=1e-6)
        assert state[SOLVES][k]["iterations"] >= 1
    assert method.grouping({"covered": list(base)}, torch.device("cuda"))[1] == 1_000_000


def test_records_each_solve():
    base = tiny_state_dict()
    experts = make_experts(base, 2)
    pool = ExpertPool(StateDictSource(base), [StateDictSource(e) for e in experts], ["a", "b"],
                      statistics=[StateDictSource(s) for s in random_statistics(base, 2)])
    method = build_method("mats")
    state = method.prepare(pool)
    assert FC1 in state["covered"] and "encoder.layer.0.mlp.fc1.bias" not in state["covered"]
    tvs = pool.task_vectors(FC1)
    method.merge_tensor(FC1, pool.base_tensor(FC1), tvs, state)
    assert set(state[SOLVES][FC1]) == {"iterations", "residual", "converged", "seconds"}
    assert 1 <= state[SOLVES][FC1]["iterations"] <= 100
    assert SOLVES not in recorded(state) and "_pool" not in recorded(state)  # run-only: never in a record


def test_missing_statistics_are_clear_errors(models):
    base, experts, stats = models
    with pytest.raises(ConfigError, match=r"'regmean' needs statistics \('::gram_in'\).*none were given"):
        merge_state_dicts("regmean", base, experts)
    with pytest.raises(ConfigError, match="2 statistics files for 3 experts"):
        merge_state_dicts("fisher", base, experts, statistics=stats[:2])
    grams_only = random_statistics(base, 3, kinds=("gram_in",))
    with pytest.raises(ConfigError, match="'mats' needs '::gram_out' statistics.*expert 0"):
        merge_state_dicts("mats", base, experts, statistics=grams_only)
    with pytest.raises(ConfigError, match=r"reads statistics from its pool: call prepare\(pool\) first"):
        merge_state_dicts("regmean", base, experts, statistics=stats, state={"covered": [FC1]})
    partial = [stats[0], stats[1], {k: v for k, v in stats[2].items() if k != f"{FC1}::fisher"}]
    with pytest.raises(ConfigError, match=f"'{FC1}::fisher' is missing for expert 'expert 2'.*'expert 0'"):
        merge_state_dicts("fisher", base, experts, statistics=partial)


@pytest.mark.parametrize("method,params", [("fisher", {}), ("regmean", {}), ("mats", {"objective": "kfac"})])
def test_statistics_files_through_merge_checkpoints(tmp_path, cache, model_files, method, params):
    base_path, expert_paths, base, experts = model_files
    stats = random_statistics(base, 3)
    stat_paths = write_statistics(tmp_path / "stats", stats)
    out = tmp_path / "out"
    result = merge_checkpoints(method, base_path, expert_paths, str(out), params, shard_size=500, cache=cache,
                               device="cpu", statistics=stat_paths)
    expected = merge_state_dicts(method, base, experts, params, statistics=stats)
    with open_checkpoint(str(out), cache=cache) as merged:
        assert all(torch.equal(merged.get(k), expected[k]) for k in expected)
    roles = [(i.role, i.name) for i in result.inputs]
    assert roles[-3:] == [("statistics", "expert0"), ("statistics", "expert1"), ("statistics", "expert2")]


def test_bad_statistics_files_fail_before_compute(tmp_path, cache, model_files):
    base_path, expert_paths, base, _ = model_files
    stats = random_statistics(base, 3)
    stats[1]["nope.weight::fisher"] = torch.ones(2)
    paths = write_statistics(tmp_path / "stats", stats)
    with pytest.raises(CheckpointError, match="expert1.statistics.safetensors.*'nope.weight'"):
        merge_checkpoints("fisher", base_path, expert_paths, str(tmp_path / "out"), cache=cache, statistics=paths)
    with pytest.raises(ConfigError, match="'fisher' needs statistics"):
        merge_checkpoints("fisher", base_path, expert_paths, str(tmp_path / "out"), cache=cache)
    assert not (tmp_path / "out").exists()


def test_cli_merge_with_statistics(tmp_path, model_files, capsys):
    base_path, expert_paths, base, experts = model_files
    stats = random_statistics(base, 3)
    stat_paths = write_statistics(tmp_path / "stats", stats)
    args = ["merge", "--method", "mats", "--base", base_path, "--out", str(tmp_path / "out"), "--device", "cpu",
            "--param", "objective=regmean", "--param", "init=average"]
    for expert, stat in zip(expert_paths, stat_paths):
        args += ["--expert", expert, "--statistics", stat]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "merged 3 experts with mats" in printed and printed.count("statistics ") == 3
    expected = merge_state_dicts("mats", base, experts, {"objective": "regmean", "init": "average"}, statistics=stats)
    with open_checkpoint(str(tmp_path / "out")) as merged:
        assert all(torch.equal(merged.get(k), expected[k]) for k in expected)
    assert main([*args[:6], str(tmp_path / "other"), *args[7:-2]]) == 2
    assert "2 statistics files for 3 experts" in capsys.readouterr().err
