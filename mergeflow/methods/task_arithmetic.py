"""Task Arithmetic (Ilharco et al., 2023): theta = theta_0 + lambda * sum_i tau_i over every parameter."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from mergeflow.methods.base import MergeMethod, MethodParams


class TaskArithmeticParams(MethodParams):
    scaling: float = Field(0.3, ge=0.0, le=10.0,
                           description="lambda applied to the sum of task vectors (0.3: the 8-task CLIP default)")


class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    summary = "theta_0 + lambda * sum of task vectors (data-free)."
    Params = TaskArithmeticParams
    sweep_grid = {"scaling": [round(0.1 * i, 1) for i in range(1, 11)]}
    scaling_param = "scaling"
    checks_inline = True
    elementwise = True

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: torch.Tensor,
                     state: dict[str, Any]) -> torch.Tensor:
        return task_vectors.sum(dim=0).mul_(self.params.scaling).add_(base)  # = base + lambda * sum, in place
