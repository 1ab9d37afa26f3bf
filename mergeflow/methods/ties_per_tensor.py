"""TIES as mergekit computes it: each tensor of each task vector trimmed to its own top-d magnitudes, signs elected
per coordinate from the weighted sum, the agreeing entries averaged by weight (mergekit's `ties`). Mergeflow's
own `ties` trims by a model-wide top-k instead (the TIES paper and the vision benchmarks)."""

from __future__ import annotations

from pydantic import Field

from mergeflow.methods.gta import GeneralizedTaskArithmetic, SparseParams
from mergeflow.methods.settings import Setting


class TiesPerTensorParams(SparseParams):
    density: Setting = Field(
        0.2, description="fraction of each tensor's task-vector entries kept (largest |values| of the tensor)")
    normalize: bool = Field(True, description="divide by the sum of the weights of the agreeing entries")


class TiesPerTensor(GeneralizedTaskArithmetic):
    name = "ties_per_tensor"
    summary = "TIES with a per-tensor top-k and per-expert weights/densities (mergekit's ties; data-free)."
    Params = TiesPerTensorParams
    sweep_grid = {"density": [0.2, 0.5, 0.8], "scaling": [0.5, 1.0, 1.5]}
    sparsification = "magnitude"
    consensus = True
