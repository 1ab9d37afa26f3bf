"""Linear (model soups; mergekit's `linear`): the weighted mean of the models, sum_i w_i theta_i / sum_i w_i, where
the base counts as one of the models with `base_weight` (0: the experts alone). Without `normalize` the weighted
sum itself. Weights may be numbers, layer gradients or name filters, per expert."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from mergeflow.errors import ConfigError
from mergeflow.methods.gta import GeneralizedTaskArithmetic, WeightParams
from mergeflow.methods.settings import Setting, depth, resolve


class LinearParams(WeightParams):
    base_weight: Setting = Field(0.0, description="the base's own weight among the models (0: the experts alone)")
    normalize: bool = Field(True, description="divide by the sum of the weights (a weighted mean)")


class Linear(GeneralizedTaskArithmetic):
    name = "linear"
    summary = "Weighted mean of the models, the base among them by base_weight (mergekit's linear; data-free)."
    Params = LinearParams
    search_grid = {}
    scaling_param = None
    elementwise = True

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: torch.Tensor,
                     state: dict[str, Any]) -> torch.Tensor:
        t = depth(name, state.get("layers", {}))
        weights = [self.value("weight", i, name, t) for i in range(len(task_vectors))]
        total = sum(weights) + (resolve(self.params.base_weight, name, t) or 0.0)
        mixed = torch.zeros_like(base)
        for weight, tau in zip(weights, task_vectors):
            mixed.add_(tau, alpha=weight)
        if not self.params.normalize:
            return base * total + mixed
        if total == 0:
            raise ConfigError(f"method 'linear': the weights of tensor {name!r} sum to 0 (normalize divides by it)")
        return base + mixed / total
