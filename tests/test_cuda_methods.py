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

from factories import random_statistics, write_statistics
from mergeflow.checkpoints import open_checkpoint
from mergeflow.merge import merge_checkpoints

DEVICE = os.environ.get("MERGEFLOW_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs CUDA")

CASES = [
    ("average", {}, 1e-4), ("task_arithmetic", {}, 1e-4), ("ties", {}, 1e-4), ("dare", {}, 1e-4),
    ("tsv", {}, 1e-4), ("iso_c", {}, 1e-4), ("iso_cts", {}, 1e-4), ("wudi", {"steps": 50}, 1e-3),
    ("doge_ta", {"steps": 50}, 1e-3), ("fisher", {}, 1e-4), ("regmean", {}, 1e-4),
    ("mats", {"objective": "kfac"}, 1e-4),
]
DATA_AWARE = {"fisher", "regmean", "mats"}


@pytest.mark.parametrize("method,params,tolerance", CASES, ids=[case[0] for case in CASES])
def test_a_merge_on_the_device_gives_the_cpu_result(tmp_path, cache, model_files, method, params, tolerance):
    base, experts, base_tensors, _ = model_files
    stats = write_statistics(tmp_path, random_statistics(base_tensors, len(experts))) if method in DATA_AWARE else None
    outputs = [str(tmp_path / "on-cpu"), str(tmp_path / "on-device")]
    for device, out in zip(("cpu", DEVICE), outputs):
        merge_checkpoints(method, base, experts, out, params, device=device, cache=cache, statistics=stats)
    with open_checkpoint(base, cache=cache) as theta0, open_checkpoint(outputs[0], cache=cache) as cpu, \
            open_checkpoint(outputs[1], cache=cache) as dev:
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
