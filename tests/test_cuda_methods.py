"""Every data-free and data-aware merge method gives the CPU's result on a CUDA device (skipped without one).

The comparison is on the update (merged - base), by relative Frobenius error per tensor: 1e-4 for the closed-form
and spectral methods (different BLAS / LAPACK, same float arithmetic), 1e-3 where Adam steps from a gradient
(WUDI, DOGE TA: an entry whose gradient is at rounding-noise level may step the other way first).
`MERGEFLOW_TEST_DEVICE=cpu` runs the same comparison on the CPU, to check this file on a machine without CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

from factories import make_experts, tiny_state_dict
from mergeflow.checkpoints import open_checkpoint
from mergeflow.merge import merge_checkpoints
from mergeflow.statistics import Statistics, save_statistics

DEVICE = os.environ.get("MERGEFLOW_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs CUDA")

CASES = [
    ("average", {}, 1e-4), ("task_arithmetic", {}, 1e-4), ("ties", {}, 1e-4), ("dare", {}, 1e-4),
    ("tsv", {}, 1e-4), ("iso_c", {}, 1e-4), ("iso_cts", {}, 1e-4), ("wudi", {"steps": 50}, 1e-3),
    ("doge_ta", {"steps": 50}, 1e-3), ("fisher", {}, 1e-4), ("regmean", {}, 1e-4),
    ("mats", {"objective": "kfac"}, 1e-4),
]
DATA_AWARE = {"fisher", "regmean", "mats"}


def _statistics(base: dict[str, torch.Tensor], experts: int, root) -> list[str]:
    """Positive Fishers and full-rank Grams for every expert, written as statistics files."""
    paths = []
    for i in range(experts):
        g = torch.Generator().manual_seed(100 + i)
        tensors = {}
        for name, value in base.items():
            if not value.is_floating_point():
                continue
            tensors[f"{name}::fisher"] = torch.rand(value.shape, generator=g) + 0.1
            if value.dim() == 2:
                for kind, d in (("gram_in", value.shape[1]), ("gram_out", value.shape[0])):
                    x = torch.randn(2 * d + 3, d, generator=g)
                    tensors[f"{name}::{kind}"] = x.T @ x / len(x)
        path = root / f"expert{i}.statistics.safetensors"
        save_statistics(Statistics(tensors, {"format": "mergeflow-statistics"}), path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("cuda-methods")
    base = tiny_state_dict()
    base["encoder.layer.0.mlp.fc1.weight"] = torch.randn(48, 24, generator=torch.Generator().manual_seed(3))
    base["encoder.layer.0.mlp.fc1.bias"] = torch.zeros(48)
    base["encoder.layer.0.mlp.fc2.weight"] = torch.randn(8, 48, generator=torch.Generator().manual_seed(4))
    base["encoder.layer.0.attn.out_proj.weight"] = torch.randn(8, 24, generator=torch.Generator().manual_seed(5))
    experts = make_experts(base, 4)
    save_file(base, str(root / "base.safetensors"))
    paths = []
    for i, expert in enumerate(experts):
        save_file(expert, str(root / f"expert{i}.safetensors"))
        paths.append(str(root / f"expert{i}.safetensors"))
    return root, str(root / "base.safetensors"), paths, _statistics(base, len(experts), root)


@pytest.mark.parametrize("method,params,tolerance", CASES, ids=[case[0] for case in CASES])
def test_a_merge_on_the_device_gives_the_cpu_result(inputs, cache, method, params, tolerance):
    root, base, experts, statistics = inputs
    stats = statistics if method in DATA_AWARE else None
    outputs = {}
    for device in ("cpu", DEVICE):
        out = root / f"{method}-{device}"
        merge_checkpoints(method, base, experts, str(out), params, device=device, cache=cache, statistics=stats,
                          overwrite=True)
        outputs[device] = out
    with open_checkpoint(base, cache=cache) as theta0, open_checkpoint(str(outputs["cpu"]), cache=cache) as cpu, \
            open_checkpoint(str(outputs[DEVICE]), cache=cache) as dev:
        assert dev.keys() == cpu.keys()
        for name in cpu.keys():
            want, got = cpu.get(name), dev.get(name)
            assert got.dtype == want.dtype and got.shape == want.shape, name
            if not want.is_floating_point():
                assert torch.equal(got, want), name
                continue
            update = want.double() - theta0.get(name).double()
            error = (got.double() - want.double()).norm() / update.norm().clamp(min=1e-12)
            assert error <= tolerance, f"{method} {name}: relative error of the update {error:.2e}"
