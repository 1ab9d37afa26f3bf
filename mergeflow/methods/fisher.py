"""Fisher merging (Matena & Raffel, 2022): theta = sum_i F_i theta_i / sum_i F_i elementwise, with each expert's
diagonal Fisher F_i (`<param>::fisher` statistics).

As FusionBench does: `minimal_fisher_weight` (1e-6) is added to every F_i, so coordinates no expert's Fisher
reaches fall back to the average; with `normalize_fisher_weight` (default, as FusionBench) model i is weighted
by c_i proportional to 1 / (||F_i|| + eps), ||F_i|| the L2 norm over all its Fisher entries, so that a model
with a larger Fisher overall does not dominate: theta = sum_i c_i (F_i + eps) theta_i / sum_i c_i (F_i + eps).
Parameters without a Fisher are averaged.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field
from mergeflow.progress import progress_bar

from mergeflow.methods.base import MethodParams
from mergeflow.methods.data_aware import DataAwareMethod
from mergeflow.statistics import FISHER
from mergeflow.task_vectors import ExpertPool


class FisherParams(MethodParams):
    minimal_fisher_weight: float = Field(1e-6, ge=0.0, description="added to every Fisher entry (FusionBench: 1e-6)")
    normalize_fisher_weight: bool = Field(
        True, description="weight each model by 1 / (L2 norm of its whole Fisher), as FusionBench does")


class FisherMerging(DataAwareMethod):
    name = "fisher"
    summary = "Diagonal-Fisher-weighted average of the experts (needs statistics: ::fisher)."
    Params = FisherParams
    search_grid = {"minimal_fisher_weight": [1e-6, 1e-3]}

    def statistic_kinds(self) -> tuple[str, ...]:
        return (FISHER,)

    def prepare(self, pool: ExpertPool, *, progress: bool = False) -> dict[str, Any]:
        state = super().prepare(pool, progress=progress)
        if self.params.normalize_fisher_weight:
            squares = torch.zeros(len(pool.experts), dtype=torch.float64)
            for name in progress_bar(state["covered"], desc="Fisher norms", disable=not progress):
                squares += self.statistic(name, FISHER, state).reshape(len(pool.experts), -1).double().square().sum(dim=1).cpu()
            inverse = [1.0 / (math.sqrt(s) + self.params.minimal_fisher_weight) for s in squares.tolist()]
            state["model_weights"] = [w / sum(inverse) for w in inverse]
        return state

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: torch.Tensor,
                     state: dict[str, Any]) -> torch.Tensor:
        if name not in state["covered"]:
            return base + task_vectors.mean(dim=0)
        weights = self.statistic(name, FISHER, state) + self.params.minimal_fisher_weight
        if self.params.normalize_fisher_weight:
            scale = torch.tensor(state["model_weights"], dtype=weights.dtype, device=weights.device)
            weights = weights * scale.reshape(-1, *([1] * base.dim()))
        total = weights.sum(dim=0)
        # sum_i w_i theta_i / sum_i w_i with theta_i = base + tau_i, written in task vectors for fp32 accuracy
        return base + (weights * task_vectors).sum(dim=0) / total
