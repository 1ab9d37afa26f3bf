"""TSV-M, Iso-C, Iso-CTS and WUDI against FusionBench 0.2.33's own code (loaded from its wheel by
benchmarks/fusionbench_code.py) on generated experts of a CLIP-shaped model (open_clip key names, a fused
in_proj, a 4-D patch convolution, a 50-token position embedding), through Mergeflow's whole engine."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mergeflow.merge import merge_state_dicts
from mergeflow.subspace import iso_cts_sizes, polar, top_singular

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fusionbench_code  # noqa: E402

WIDTH, MLP, TOKENS, TASKS = 64, 256, 50, 8


def clip_shaped(seed: int, blocks: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    spec = [("conv1.weight", (WIDTH, 3, 8, 8)), ("class_embedding", (WIDTH,)),
            ("positional_embedding", (TOKENS, WIDTH)), ("ln_pre.weight", (WIDTH,))]
    for i in range(blocks):
        p = f"transformer.resblocks.{i}."
        spec += [(p + "attn.in_proj_weight", (3 * WIDTH, WIDTH)), (p + "attn.in_proj_bias", (3 * WIDTH,)),
                 (p + "attn.out_proj.weight", (WIDTH, WIDTH)), (p + "ln_1.weight", (WIDTH,)),
                 (p + "mlp.c_fc.weight", (MLP, WIDTH)), (p + "mlp.c_proj.weight", (WIDTH, MLP))]
    spec.append(("proj", (WIDTH, 32)))
    return {name: 0.02 * torch.randn(shape, generator=g) for name, shape in spec}


def expert(base: dict[str, torch.Tensor], task: int) -> dict[str, torch.Tensor]:
    """base + a task vector with a few strong directions of its own and two shared by all tasks, in noise."""
    g, shared = torch.Generator().manual_seed(100 + task), torch.Generator().manual_seed(7)
    out = {}
    for name, tensor in base.items():
        tv = 1e-3 * torch.randn(tensor.shape, generator=g)
        if tensor.dim() == 2:
            m, n = tensor.shape
            for source, count in ((g, 3), (shared, 2)):
                u, v = torch.randn(m, count, generator=source), torch.randn(count, n, generator=source)
                strength = 0.01 * (1 + torch.rand(count, generator=g))
                tv += (u * strength) @ v / (m * n) ** 0.5 * 4
        out[name] = tensor + tv
    return out


@pytest.fixture(scope="module")
def models():
    base = clip_shaped(0)
    experts = [expert(base, t) for t in range(TASKS)]
    task_vectors = [{k: e[k] - base[k] for k in base} for e in experts]
    return base, experts, task_vectors


def relative_errors(ours: dict[str, torch.Tensor], base, reference: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: ((ours[k] - base[k] - reference[k]).norm() / reference[k].norm()).item() for k in reference}


@pytest.mark.parametrize("method, params, reference", [
    ("tsv", {}, lambda fb, tvs: fb.load("tsvm").compute_and_sum_svd_mem_reduction(tvs, accelerator="cpu")),
    ("iso_c", {}, lambda fb, tvs: fb.load("iso").iso_c(tvs, accelerator="cpu")),
    ("iso_cts", {}, lambda fb, tvs: fb.load("iso").iso_cts(tvs, 0.8, accelerator="cpu")),
    ("iso_cts", {"common_space_fraction": 0.5},
     lambda fb, tvs: fb.load("iso").iso_cts(tvs, 0.5, accelerator="cpu")),
])
def test_matches_fusionbench(models, method, params, reference):
    base, experts, task_vectors = models
    expected = reference(fusionbench_code, task_vectors)
    merged = merge_state_dicts(method, base, experts, params)
    errors = relative_errors(merged, base, expected)
    assert max(errors.values()) <= 1e-4, sorted(errors.items(), key=lambda kv: -kv[1])[:3]


def test_alpha_scales_the_update(models):
    base, experts, _ = models
    one = merge_state_dicts("tsv", base, experts[:4])
    half = merge_state_dicts("tsv", base, experts[:4], {"alpha": 0.5})
    for k in base:
        torch.testing.assert_close(half[k] - base[k], 0.5 * (one[k] - base[k]), rtol=1e-4, atol=1e-8)


def test_wudi_replays_fusionbench(models):
    base, experts, task_vectors = models
    fb = fusionbench_code.load("wudi")
    expected = fb.wudi_merging(task_vectors, accelerator="cpu", iter_num=50)
    replay = merge_state_dicts("wudi", base, experts, {"steps": 50, "solver": "autograd"})
    gram = merge_state_dicts("wudi", base, experts, {"steps": 50})
    assert max(relative_errors(replay, base, expected).values()) <= 1e-3
    # the closed-form gradient departs only by rounding: still within the replay's tolerance here
    assert max(relative_errors(gram, base, expected).values()) <= 1e-3
    # and the steps move the 2-D updates away from the initial sum (the test would pass vacuously otherwise)
    key = "transformer.resblocks.0.mlp.c_fc.weight"
    assert not torch.allclose(expected[key], sum(tv[key] for tv in task_vectors))


def test_exclude_averages_a_matrix(models):
    base, experts, task_vectors = models
    merged = merge_state_dicts("iso_c", base, experts, {"exclude": [r"^proj$"]})
    torch.testing.assert_close(merged["proj"] - base["proj"],
                               torch.stack([tv["proj"] for tv in task_vectors]).mean(0), rtol=1e-5, atol=1e-7)


def test_top_singular_and_polar_match_the_svd():
    g = torch.Generator().manual_seed(0)
    for shape in ((40, 12), (12, 40)):
        a = torch.randn(shape, generator=g)
        u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
        tu, ts, tvh = top_singular(a, 5)
        torch.testing.assert_close(ts.double(), s[:5], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close((tu * ts) @ tvh, ((u[:, :5] * s[:5]) @ vh[:5]).float(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(polar(a), (u @ vh).float(), rtol=1e-4, atol=1e-5)


def test_iso_cts_sizes_round_as_python():
    assert iso_cts_sizes(768, 8, 0.8) == (616, 19)
    assert iso_cts_sizes(1024, 8, 0.8) == (816, 26)
    assert iso_cts_sizes(50, 8, 0.8) == (42, 1)
    assert iso_cts_sizes(257, 8, 0.8) == (209, 6)  # 6.5 rounds to 6 (banker's rounding)


def test_bad_exclude_pattern_is_named():
    from mergeflow.errors import ConfigError
    from mergeflow.methods import build_method

    with pytest.raises(ConfigError, match=r"exclude.*\[unclosed"):
        build_method("tsv", {"exclude": ["[unclosed"]})
