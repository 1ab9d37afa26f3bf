"""Simple averaging: theta = mean_i theta_i = theta_0 + mean_i tau_i."""

from __future__ import annotations

from typing import Any

import torch

from mergeflow.methods.base import MergeMethod


class SimpleAverage(MergeMethod):
    name = "average"
    summary = "Mean of the experts' weights (data-free)."
    search_grid = {}
    checks_inline = True
    elementwise = True

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: torch.Tensor,
                     state: dict[str, Any]) -> torch.Tensor:
        return task_vectors.mean(dim=0).add_(base)
