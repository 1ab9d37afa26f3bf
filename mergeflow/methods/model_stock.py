"""Model Stock (Jang et al., 2024, as mergekit runs it): per tensor (or per row with `filter_wise`), the
interpolation ratio t = N cos / (1 + (N - 1) cos) from the mean cosine between the experts' task vectors, and
theta = t * mean_i theta_i + (1 - t) * theta_0 (theta_0 kept where 1 + (N - 1) cos is 0). Needs two experts or more."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from mergeflow.methods.base import MergeMethod, MethodParams
from mergeflow.task_vectors import ExpertPool


class ModelStockParams(MethodParams):
    filter_wise: bool = Field(False, description="one ratio per row (output filter) instead of per tensor")


def stock_ratio(task_vectors: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    """t per tensor ([1, 1]) or per row ([rows, 1]: every index but the last, as mergekit's filter_wise) from the
    mean pairwise cosine of the task vectors [N, *shape]."""
    n = len(task_vectors)
    last = task_vectors.shape[-1] if filter_wise and task_vectors.dim() > 1 else -1
    offsets = task_vectors.reshape(n, -1, last) if last != -1 else task_vectors.reshape(n, 1, -1)
    norms = torch.linalg.vector_norm(offsets, dim=-1)
    cosines = [((offsets[i] * offsets[j]).sum(dim=-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
               for i in range(n) for j in range(i + 1, n)]
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(cos),
                       n * cos / torch.where(singular, torch.ones_like(denominator), denominator))


class ModelStock(MergeMethod):
    name = "model_stock"
    summary = "Interpolate the experts' mean toward the base by the angle between task vectors (data-free)."
    Params = ModelStockParams
    search_grid = {}
    checks_inline = True
    prepare_is_cheap = True
    searched_by_default = False  # mergekit's: `auto` searches it when named in search.methods
    expert_count = (2, None)

    def prepare(self, pool: ExpertPool, *, progress: bool = False) -> dict[str, Any]:
        self.check_expert_count(len(pool.experts))
        return {}

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: torch.Tensor,
                     state: dict[str, Any]) -> torch.Tensor:
        self.check_expert_count(len(task_vectors))
        t = stock_ratio(task_vectors, self.params.filter_wise)
        rows = base.reshape(t.shape[0], -1)
        average = (base + task_vectors.mean(dim=0)).reshape(t.shape[0], -1)
        return (t * average + (1 - t) * rows).reshape(base.shape)
