"""Each method against a direct dense formula written here, independently of the library's code."""

from __future__ import annotations

import pytest
import torch

from factories import fit_experts, make_experts, tiny_state_dict
from mergeflow.errors import ConfigError
from mergeflow.merge import merge_state_dicts
from mergeflow.methods import METHODS, build_method, describe_methods
from mergeflow.methods.data_aware import DataAwareMethod
from mergeflow.sparsify import dare_keep_mask

DATA_FREE = sorted(name for name, cls in METHODS.items()
                   if not issubclass(cls, DataAwareMethod) and not cls.needs_objective)


def _float_keys(sd):
    return [k for k, v in sd.items() if v.is_floating_point()]


def _dense_ties(base, experts, density, scaling, merge):
    keys = _float_keys(base)
    tvs = torch.stack([torch.cat([(e[k].float() - base[k].float()).reshape(-1) for k in keys]) for e in experts])
    d = tvs.shape[1]
    k = d - int(d * density)
    kth = tvs.abs().kthvalue(k, dim=1, keepdim=True).values if k > 0 else torch.zeros(len(experts), 1)
    trimmed = tvs * (tvs.abs() >= kth)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    selected = torch.where(sign > 0, trimmed > 0, trimmed < 0) * trimmed
    agg = selected.sum(0)
    if merge == "mean":
        agg = agg / (selected != 0).sum(0).clamp(min=1)
    out, offset = dict(base), 0
    for k in keys:
        n = base[k].numel()
        out[k] = (base[k].float() + scaling * agg[offset:offset + n].reshape(base[k].shape)).to(base[k].dtype)
        offset += n
    return out


def _close(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0), k


@pytest.fixture
def models():
    base = tiny_state_dict()
    return base, make_experts(base, 4)


def test_average_is_the_mean_of_the_experts(models):
    base, experts = models
    expected = {k: torch.stack([e[k].float() for e in experts]).mean(0) if v.is_floating_point() else v
                for k, v in base.items()}
    _close(merge_state_dicts("average", base, experts), expected)


def test_task_arithmetic(models):
    base, experts = models
    expected = {k: base[k] + 0.7 * sum(e[k] - base[k] for e in experts) if v.is_floating_point() else v
                for k, v in base.items()}
    _close(merge_state_dicts("task_arithmetic", base, experts, {"scaling": 0.7}), expected)


@pytest.mark.parametrize("density,merge,scaling", [(0.2, "sum", 0.3), (0.5, "mean", 1.0), (1.0, "sum", 0.3)])
def test_ties_matches_the_dense_formula(models, density, merge, scaling):
    base, experts = models
    got = merge_state_dicts("ties", base, experts, {"density": density, "merge": merge, "scaling": scaling})
    _close(got, _dense_ties(base, experts, density, scaling, merge))


def test_ties_resolves_exactly_cancelling_coordinates_by_majority_sign():
    base = {"w": torch.zeros(6)}
    experts = [{"w": torch.tensor([1.0, -2.0, 3.0, 1.0, 0.5, 0.0])},
               {"w": torch.tensor([-1.0, -2.0, 3.0, 1.0, 0.5, 0.0])}]  # coordinate 0 cancels exactly
    got = merge_state_dicts("ties", base, experts, {"density": 1.0, "scaling": 1.0})["w"]
    # elected signs: [0, -, +, +, +, 0] -> majority + ; coordinate 0 keeps only the positive entry
    assert torch.equal(got, torch.tensor([1.0, -4.0, 6.0, 2.0, 1.0, 0.0]))
    _close({"w": got}, _dense_ties(base, experts, 1.0, 1.0, "sum"))


def _dare_kept(base, experts, params, index: int, key: str) -> torch.Tensor:
    """Which entries of expert `index`'s task vector DARE kept in `key`, read off the merged output alone: with
    every other expert equal to the base, the update is s * m * tau / (1 - p) (paper, eq. 2-3), so each entry is
    exactly 0 (dropped) or that rescaled value (kept). No library mask function is used."""
    lone = [expert if i == index else base for i, expert in enumerate(experts)]
    update = merge_state_dicts("dare", base, lone, params)[key].double() - base[key].double()
    tau = experts[index][key].double() - base[key].double()
    rescaled = params["scaling"] * tau / (1 - params["drop_rate"])
    kept = torch.isclose(update, rescaled, atol=1e-6, rtol=1e-5) & (tau != 0)
    dropped = update.abs() < 1e-7
    assert (kept | dropped).all(), f"{key}: entries neither dropped nor rescaled by 1 / (1 - p)"
    return kept


def test_dare_drops_rescales_and_is_seeded(models):
    base, experts = models
    params = {"drop_rate": 0.4, "scaling": 0.5, "seed": 3}
    merged = merge_state_dicts("dare", base, experts, params)
    keys = [k for k, v in base.items() if v.is_floating_point() and v.numel() > 1]
    masks = {(i, k): _dare_kept(base, experts, params, i, k) for i in range(len(experts)) for k in keys}
    for k in keys:  # the merge of all experts is the sum of the rescaled, independently masked task vectors
        total = sum((experts[i][k].double() - base[k].double()) * masks[i, k] for i in range(len(experts)))
        assert torch.allclose(merged[k].double(), base[k].double() + 0.5 * total / 0.6, atol=1e-6), k
    kept = torch.cat([m.flatten() for m in masks.values()]).double().mean().item()
    assert abs(kept - 0.6) < 0.05, f"kept {kept:.3f} of entries, expected about 1 - p = 0.6"
    w = "encoder.layer.0.mlp.fc1.weight"
    assert not torch.equal(masks[0, w], masks[1, w]), "tasks share a mask"
    assert not torch.equal(masks[0, w].flatten(), masks[0, "encoder.layer.0.mlp.fc2.weight"].flatten()), \
        "tensors of the same size share a mask"
    again = merge_state_dicts("dare", base, experts, params)
    other = merge_state_dicts("dare", base, experts, {**params, "seed": 4})
    assert torch.equal(again[w], merged[w])
    assert not torch.equal(again[w], other[w])


def test_dare_mask_keeps_about_one_minus_p():
    keep = dare_keep_mask((200, 200), 0.9, 0, 0, "w")
    assert abs(keep.float().mean().item() - 0.1) < 0.01


def test_bf16_inputs_give_bf16_outputs_computed_in_fp32():
    base = tiny_state_dict(dtype=torch.bfloat16)
    experts = make_experts(base, 2)
    got = merge_state_dicts("task_arithmetic", base, experts, {"scaling": 0.5})
    k = "encoder.layer.0.mlp.fc1.weight"
    expected = (base[k].float() + 0.5 * sum(e[k].float() - base[k].float() for e in experts)).to(torch.bfloat16)
    assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], expected)


def test_non_float_buffers_pass_through_unchanged(models):
    base, experts = models
    for method in DATA_FREE:
        assert torch.equal(merge_state_dicts(method, base, fit_experts(method, experts))["embeddings.position_ids"],
                           base["embeddings.position_ids"])


def test_unknown_method_and_parameters_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown merge method 'tie'.*ties"):
        build_method("tie")
    with pytest.raises(ConfigError, match="'ties'.*lamda"):
        build_method("ties", {"lamda": 0.3})
    with pytest.raises(ConfigError, match="density"):
        build_method("ties", {"density": 1.5})


def test_every_method_is_described_with_defaults():
    described = {m["name"]: m for m in describe_methods()}
    assert set(described) == set(METHODS)
    ties = {p["name"]: p for p in described["ties"]["params"]}
    assert ties["density"]["default"] == 0.2 and ties["scaling"]["default"] == 0.3
    assert all(p["description"] for m in described.values() for p in m["params"])
