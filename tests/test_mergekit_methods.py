"""mergekit's methods (SLERP, Model Stock, the generalised task-arithmetic family) and their per-expert, per-layer
parameters, each against a direct formula written here on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from mergeflow.errors import CheckpointError, ConfigError
from mergeflow.merge import merge_checkpoints, merge_state_dicts
from mergeflow.methods import build_method
from mergeflow.methods.base import sum_parts
from mergeflow.methods.gta import keep_floats
from mergeflow.methods.settings import depth, layer_counts, resolve
from mergeflow.methods.slerp import slerp_coefficients, slerp_tile_sums
from mergeflow.sparsify import dare_keep_mask

LAYERS = 3


def _model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(10, 6, generator=g)}
    for i in range(LAYERS):
        sd[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(6, 6, generator=g)
        sd[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(12, 6, generator=g)
        sd[f"model.layers.{i}.input_layernorm.weight"] = 1 + 0.1 * torch.randn(6, generator=g)
    sd["model.norm.weight"] = torch.ones(6)
    sd["lm_head.weight"] = torch.randn(10, 6, generator=g)
    return sd


@pytest.fixture
def models():
    base = _model(0)
    experts = []
    for i in range(3):
        g = torch.Generator().manual_seed(100 + i)
        experts.append({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()})
    return base, experts


def _t(name: str) -> float:
    """mergekit's depth, written out: layer i of 3 -> i / 2; embeddings, norm and head -> 0."""
    for i in range(LAYERS):
        if name.startswith(f"model.layers.{i}."):
            return i / (LAYERS - 1)
    return 0.0


def _close(got, expected, atol=1e-5):
    assert got.keys() == expected.keys()
    for k in got:
        assert torch.allclose(got[k], expected[k], atol=atol, rtol=1e-5), (k, (got[k] - expected[k]).abs().max())


def test_settings_resolve_numbers_gradients_and_filters():
    assert resolve(0.3, "x", 0.7) == 0.3
    assert resolve((0.0, 1.0), "x", 0.25) == pytest.approx(0.25)
    assert resolve((0.0, 0.5, 1.0), "x", 0.75) == pytest.approx(0.75)
    assert resolve((0.0, 1.0, 0.0), "x", 1.0) == 0.0
    params = build_method("slerp", {"t": [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.2}]})
    assert resolve(params.params.t, "model.layers.2.self_attn.q_proj.weight", 1.0) == 1.0
    assert resolve(params.params.t, "model.layers.2.mlp.up_proj.weight", 1.0) == pytest.approx(0.2)
    assert resolve(params.params.t, "lm_head.weight", 0.0) is None  # no filter matches: the caller's default
    counts = layer_counts(["encoder.block.0.a", "encoder.block.4.a", "decoder.block.1.b", "decoder.block.0.b",
                           "shared.weight"])
    assert counts == {"encoder.block": 5, "decoder.block": 2}
    assert depth("encoder.block.1.a", counts) == 0.25 and depth("decoder.block.1.b", counts) == 1.0
    assert depth("shared.weight", counts) == 0.0


def test_task_arithmetic_weighted_with_per_expert_gradients_and_filters(models):
    base, experts = models
    params = {"scaling": 0.8, "per_expert": [{"weight": [1.0, 0.2]}, {"weight": [{"filter": "mlp", "value": 0.5},
                                                                             {"value": 0.1}]}, {"weight": 0.3}]}
    got = merge_state_dicts("task_arithmetic_weighted", base, experts, params)
    expected = {}
    for k, b in base.items():
        t = _t(k)
        weights = [1.0 + (0.2 - 1.0) * t, 0.5 if "mlp" in k else 0.1, 0.3]
        expected[k] = b + 0.8 * sum(w * (e[k] - b) for w, e in zip(weights, experts))
    _close(got, expected)
    normalized = merge_state_dicts("task_arithmetic_weighted", base, experts, {"weight": 2.0, "normalize": True})
    _close(normalized, {k: b + sum(e[k] - b for e in experts) / 3 for k, b in base.items()})


def _top(tau: torch.Tensor, density: float) -> torch.Tensor:
    k = max(1, int(density * tau.numel()))
    keep = torch.zeros(tau.numel())
    keep[tau.abs().reshape(-1).argsort(descending=True)[:k]] = 1
    return tau * keep.reshape(tau.shape)


def _consensus(deltas: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    stacked = torch.stack([w * d for w, d in zip(weights, deltas)])
    majority = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = stacked.sign() == majority
    mixed = (stacked * agree).sum(0)
    if normalize:
        divisor = (torch.tensor(weights).reshape(-1, *[1] * mixed.dim()) * agree).sum(0)
        mixed = mixed / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return mixed


def test_ties_per_tensor_is_mergekits_ties(models):
    base, experts = models
    weights, densities = [1.0, 0.5, 0.7], [0.3, 0.6, 0.2]
    params = {"per_expert": [{"weight": w, "density": d} for w, d in zip(weights, densities)], "scaling": 0.9}
    got = merge_state_dicts("ties_per_tensor", base, experts, params)
    expected = {k: b + 0.9 * _consensus([_top(e[k] - b, d) for e, d in zip(experts, densities)], weights, True)
                for k, b in base.items()}
    _close(got, expected)


def test_breadcrumbs_drops_the_largest_and_the_smallest(models):
    base, experts = models
    density, gamma = 0.5, 0.1

    def crumbs(tau):
        n = tau.numel()
        kept, top = int(density * n), int(gamma * n)
        low = max(0, n - kept - top)
        keep = torch.zeros(n)
        keep[tau.abs().reshape(-1).argsort()[low:low + kept]] = 1
        return tau * keep.reshape(tau.shape)

    got = merge_state_dicts("breadcrumbs", base, experts, {"density": density, "gamma": gamma, "weight": 0.4})
    _close(got, {k: b + sum(0.4 * crumbs(e[k] - b) for e in experts) for k, b in base.items()})
    got = merge_state_dicts("breadcrumbs_ties", base, experts, {"density": density, "gamma": gamma})
    _close(got, {k: b + _consensus([crumbs(e[k] - b) for e in experts], [1.0] * 3, False) for k, b in base.items()})


def test_dare_linear_keeps_a_random_fraction_rescaled_to_the_l1_norm():
    base = {"w": torch.zeros(200, 100)}
    expert = {"w": torch.randn(200, 100, generator=torch.Generator().manual_seed(3))}
    got = merge_state_dicts("dare_linear", base, [expert], {"density": 0.3})["w"]
    kept = got != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.02  # 20,000 draws: 5 standard deviations
    ratio = got[kept] / expert["w"][kept]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))  # one L1 rescale factor for the whole tensor
    assert torch.isclose(got.abs().sum(), expert["w"].abs().sum(), rtol=1e-5)
    again = merge_state_dicts("dare_linear", base, [expert], {"density": 0.3})["w"]
    other_seed = merge_state_dicts("dare_linear", base, [expert], {"density": 0.3, "seed": 1})["w"]
    assert torch.equal(got, again) and not torch.equal(got, other_seed)
    plain = merge_state_dicts("dare_linear", base, [expert], {"density": 0.3, "rescale": False})["w"]
    assert torch.equal(plain != 0, kept) and torch.equal(plain[kept], expert["w"][kept])


def test_dare_ties_elects_signs_over_the_dropped_vectors(models):
    base, experts = models
    full = merge_state_dicts("dare_ties", base, experts, {"density": 1.0, "normalize": True})
    _close(full, {k: b + _consensus([e[k] - b for e in experts], [1.0] * 3, True) for k, b in base.items()})
    dropped = merge_state_dicts("dare_ties", base, experts, {"density": 0.5})
    assert any(not torch.allclose(dropped[k], full[k]) for k in base)


def test_della_keeps_large_magnitudes_more_often():
    g = torch.Generator().manual_seed(4)
    base = {"w": torch.zeros(400, 200)}
    expert = {"w": torch.randn(400, 200, generator=g)}
    got = merge_state_dicts("della_linear", base, [expert], {"density": 0.5, "epsilon": 0.2, "rescale": False})["w"]
    kept = got != 0
    assert abs(kept.float().mean().item() - 0.5) < 0.01
    order = expert["w"].abs().argsort(dim=1)
    small, large = kept.gather(1, order[:, :20]), kept.gather(1, order[:, -20:])
    assert abs(small.float().mean().item() - 0.31) < 0.03  # rank ~ 0 of each row: d - eps (+ a little)
    assert abs(large.float().mean().item() - 0.69) < 0.03
    with pytest.raises(ConfigError, match="density \\+/- epsilon"):
        merge_state_dicts("della", base, [expert], {"density": 0.9, "epsilon": 0.2})


def _slerp(t, v0, v1, threshold=0.9995):
    a, b = v0.double().reshape(-1), v1.double().reshape(-1)
    dot = float(a @ b / (a.norm() * b.norm()))
    if abs(dot) > threshold:
        return ((1 - t) * v0.double() + t * v1.double()).float()
    theta = math.acos(dot)
    return ((math.sin((1 - t) * theta) * v0.double() + math.sin(t * theta) * v1.double()) / math.sin(theta)).float()


def test_slerp_with_a_layer_gradient_and_the_linear_fallback(models):
    base, experts = models
    got = merge_state_dicts("slerp", base, experts[:1], {"t": [0.0, 0.5, 1.0]})
    _close(got, {k: _slerp(_t(k), b, experts[0][k]) for k, b in base.items()})
    layer = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.allclose(got[layer], (base[layer] + experts[0][layer]) / 2, atol=1e-4)  # really spherical
    parallel = {k: 2 * b for k, b in base.items()}  # same direction: the linear fallback
    _close(merge_state_dicts("slerp", base, [parallel], {"t": 0.25}), {k: 1.25 * b for k, b in base.items()})
    with pytest.raises(ConfigError, match="'slerp' merges exactly 1 expert; got 2"):
        merge_state_dicts("slerp", base, experts[:2])


def test_model_stock_ratio_from_the_mean_cosine(models):
    base, experts = models

    def stock(b, ws, rows):
        taus = [(w - b).reshape(rows, -1) for w in ws]
        cos = torch.stack([torch.nn.functional.cosine_similarity(taus[i], taus[j], dim=1)
                           for i in range(3) for j in range(i + 1, 3)]).mean(0).unsqueeze(1)
        t = 3 * cos / (1 + 2 * cos)
        mean = sum(w for w in ws).reshape(rows, -1) / 3
        return (t * mean + (1 - t) * b.reshape(rows, -1)).reshape(b.shape)

    _close(merge_state_dicts("model_stock", base, experts),
           {k: stock(b, [e[k] for e in experts], 1) for k, b in base.items()})
    _close(merge_state_dicts("model_stock", base, experts, {"filter_wise": True}),
           {k: stock(b, [e[k] for e in experts], b.numel() // b.shape[-1]) for k, b in base.items()})
    with pytest.raises(ConfigError, match="'model_stock' merges at least 2 experts; got 1"):
        merge_state_dicts("model_stock", base, experts[:1])


def test_bad_per_expert_values_fail_naming_the_field(models):
    base, experts = models
    with pytest.raises(ConfigError, match="per_expert has 2 entries for 3 experts"):
        merge_state_dicts("dare_ties", base, experts, {"per_expert": [{"weight": 1}, {"weight": 2}]})
    with pytest.raises(ConfigError, match=r"per_expert\[0\].gamma: this method takes no gamma"):
        build_method("ties_per_tensor", {"per_expert": [{"gamma": 0.1}]})
    with pytest.raises(ConfigError, match="density: 1.5 is outside"):
        build_method("dare_ties", {"density": [0.5, 1.5]})
    with pytest.raises(ConfigError, match="slerp.*t"):
        build_method("slerp", {"t": "half"})


def test_an_expert_with_added_tokens_fails_before_any_work_naming_the_tensor(tmp_path, models):
    base, experts = models
    grown = dict(experts[0])
    grown["model.embed_tokens.weight"] = torch.cat([grown["model.embed_tokens.weight"], torch.randn(2, 6)])
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(grown, str(tmp_path / "grown.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.embed_tokens.weight.*\[12, 6\].*\[10, 6\]"):
        merge_checkpoints("ties_per_tensor", str(tmp_path / "base.safetensors"), [str(tmp_path / "grown.safetensors")],
                          str(tmp_path / "out"), device="cpu")
    assert not (tmp_path / "out").exists()


def test_dare_float_masks_are_the_seeded_bool_masks(monkeypatch):
    monkeypatch.setattr("mergeflow.sparsify._DARE_BLOCK", 1000)  # ranges that start inside and straddle mask blocks
    for offset, count in [(0, 1000), (0, 2500), (999, 2), (1234, 4321), (3000, 1)]:
        for drop in (0.0, 0.3, 0.5, 0.999):
            got = keep_floats(count, drop, 7, 2, "w", offset)
            assert got.dtype == torch.float32 and torch.equal(got, dare_keep_mask((count,), drop, 7, 2, "w", offset).float())


def test_slerp_sums_are_exact_where_acos_magnifies_errors():
    g = torch.Generator().manual_seed(5)
    v0 = torch.randn(2048, 512, generator=g)
    tau = 0.03 * torch.randn(2048, 512, generator=g)  # cos(v0, v0 + tau) ~ 0.9996, just below the fallback
    a, d = v0.double().reshape(-1), tau.double().reshape(-1)
    exact = torch.tensor([a @ a, a @ d, d @ a, d @ d])
    assert torch.allclose(sum_parts([slerp_tile_sums(v0, tau)]), exact, rtol=1e-13, atol=0)
    c0, c1 = slerp_coefficients(0.5, exact, 0.9999)
    assert (c0, c1) == pytest.approx(slerp_coefficients(0.5, sum_parts([slerp_tile_sums(v0, tau)]), 0.9999), rel=1e-12)


@pytest.mark.parametrize("method, params, n", [("slerp", {"t": 0.3}, 1), ("dare_ties", {"density": 0.6}, 3),
                                               ("dare_ties", {"density": 0.6, "normalize": True}, 3),
                                               ("dare_linear", {"density": 0.6, "weight": 0.7}, 3)])
def test_a_bf16_merge_rounds_the_fp32_merge_once(models, method, params, n):
    base, experts = models
    half = {k: v.bfloat16() for k, v in base.items()}
    halves = [{k: v.bfloat16() for k, v in e.items()} for e in experts[:n]]
    widened = merge_state_dicts(method, {k: v.float() for k, v in half.items()},
                                [{k: v.float() for k, v in e.items()} for e in halves], params)
    got = merge_state_dicts(method, half, halves, params)  # the method writes bf16 itself: no fp32 copy of the output
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], widened[k].bfloat16()) for k in base)


def test_a_nan_in_a_dropped_entry_still_fails_the_merge(tmp_path, models):
    base, experts = models
    broken = dict(experts[1])
    broken["model.norm.weight"] = broken["model.norm.weight"].clone()
    dropped = int((~dare_keep_mask((6,), 0.5, 0, 1, "model.norm.weight")).nonzero()[0])
    broken["model.norm.weight"][dropped] = float("nan")  # an entry the drop removes: x * 0 keeps the NaN
    paths = []
    for name, sd in (("base", base), ("a", experts[0]), ("b", broken)):
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
        paths.append(str(tmp_path / f"{name}.safetensors"))
    with pytest.raises(CheckpointError, match="NaN") as info:
        merge_checkpoints("dare_ties", paths[0], paths[1:], str(tmp_path / "out"), {"density": 0.5}, device="cpu")
    assert info.value.file == paths[2] and info.value.tensor == "model.norm.weight"
