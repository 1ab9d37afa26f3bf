"""RegMean (Jin et al., 2023): per linear layer, the weight that best reproduces every expert's outputs on its
own inputs, min_W sum_i ||X_i W - X_i W_i||^2, in closed form W = (sum_i G_i)^-1 sum_i G_i W_i, with
G_i = X_i^T X_i the input Gram (`<weight>::gram_in` statistics) and W in the [in, out] layout (nn.Linear stores
[out, in] and is transposed; a weight the statistics list as stored [in, out], GPT-2's Conv1D, is not). The
off-diagonals of each G_i are scaled by `reduce_non_diagonal_ratio` (0.95, FusionBench) for conditioning. Solved
with `torch.linalg.solve` (never an explicit inverse) in float64 by default. Input dimensions no expert's data
reaches (zero Gram diagonal) take the average; other parameters are averaged.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from mergeflow.errors import InputError
from mergeflow.methods.base import MethodParams
from mergeflow.methods.data_aware import DataAwareMethod, shrink_off_diagonal
from mergeflow.statistics import GRAM_IN


class RegMeanParams(MethodParams):
    reduce_non_diagonal_ratio: float = Field(
        0.95, ge=0.0, le=1.0, description="alpha scaling the Gram off-diagonals (1: plain RegMean; FusionBench 0.95)")
    precision: Literal["float32", "float64"] = Field("float64", description="dtype of the linear solve")


class RegMean(DataAwareMethod):
    name = "regmean"
    summary = "Closed-form least squares on each linear layer's inputs (needs statistics: ::gram_in)."
    Params = RegMeanParams
    search_grid = {"reduce_non_diagonal_ratio": [0.5, 0.8, 0.95, 1.0]}

    def statistic_kinds(self) -> tuple[str, ...]:
        return (GRAM_IN,)

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: torch.Tensor,
                     state: dict[str, Any]) -> torch.Tensor:
        average = base + task_vectors.mean(dim=0)
        if name not in state["covered"]:
            return average
        dtype = getattr(torch, self.params.precision)
        grams = shrink_off_diagonal(self.statistic(name, GRAM_IN, state).to(dtype), self.params.reduce_non_diagonal_ratio)
        in_out = self.in_out(name, state)

        def as_in_out(weight: torch.Tensor) -> torch.Tensor:
            return weight if in_out else weight.transpose(-2, -1)

        experts_t = as_in_out((base + task_vectors).to(dtype))  # [N, in, out]
        lhs = grams.sum(dim=0)
        rhs = (grams @ experts_t).sum(dim=0)
        free = torch.diagonal(lhs) == 0  # input dimensions with no data: decoupled, take the average
        lhs[free, free] = 1.0
        rhs[free] = as_in_out(average.to(dtype))[free]
        try:
            solution = torch.linalg.solve(lhs, rhs)
        except torch.linalg.LinAlgError:
            raise InputError(f"regmean: the summed input Gram of {name!r} is singular; "
                             "use reduce_non_diagonal_ratio < 1") from None
        return as_in_out(solution).to(torch.float32)
