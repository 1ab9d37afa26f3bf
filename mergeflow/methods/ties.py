"""TIES-Merging (Yadav et al., 2023): trim each task vector to its top-k magnitudes (global over the model),
elect a sign per coordinate, and merge only the entries that agree with it.

Two variants, chosen by `merge`:
- "sum" with scaling 0.3, density 0.2: the vision-benchmark variant (AdaMerging and FusionBench code, behind the
  familiar 72.4 on ViT-B/32 TA8): theta_0 + 0.3 * disjoint SUM. This is the default.
- "mean" with scaling ~1: the paper's disjoint MEAN (average of the agreeing entries).
Elected sign: sign of the sum of trimmed vectors; coordinates where that sum is exactly 0 take the model-wide
majority sign (the reference resolution), which `prepare` computes in a streaming pass.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from mergeflow.progress import progress_bar

from mergeflow.methods.base import MergeMethod, MethodParams
from mergeflow.sparsify import global_topk_thresholds
from mergeflow.task_vectors import ExpertPool


class TiesParams(MethodParams):
    density: float = Field(0.2, gt=0.0, le=1.0,
                           description="fraction k of each task vector kept (largest |values| over the whole model)")
    scaling: float = Field(0.3, ge=0.0, le=10.0, description="lambda applied to the disjoint merge")
    merge: Literal["sum", "mean"] = Field(
        "sum", description="disjoint sum (vision-benchmark variant) or disjoint mean (the paper's)")


def _trim(task_vectors: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    shape = (len(thresholds),) + (1,) * (task_vectors.dim() - 1)
    limit = torch.tensor(thresholds, dtype=task_vectors.dtype, device=task_vectors.device).reshape(shape)
    return task_vectors * (task_vectors.abs() >= limit)


class Ties(MergeMethod):
    name = "ties"
    summary = "Trim to top-k, elect signs, disjoint merge (data-free)."
    Params = TiesParams
    scaling_param = "scaling"
    prepare_params = ("density",)

    def prepare(self, pool: ExpertPool, *, progress: bool = False) -> dict[str, Any]:
        thresholds = global_topk_thresholds(pool, self.params.density, progress=progress)
        sign_total = 0
        for _, tv in progress_bar(pool.iter_task_vectors(), total=len(pool.float_keys()), desc="sign election",
                          disable=not progress):
            sign_total += int(torch.sign(_trim(tv, thresholds).sum(dim=0)).sum().item())
        return {"thresholds": thresholds, "majority_sign": (sign_total > 0) - (sign_total < 0)}

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: torch.Tensor,
                     state: dict[str, Any]) -> torch.Tensor:
        trimmed = _trim(task_vectors, state["thresholds"])
        sign = torch.sign(trimmed.sum(dim=0))
        sign[sign == 0] = state["majority_sign"]
        selected = trimmed * torch.where(sign > 0, trimmed > 0, trimmed < 0)
        merged = selected.sum(dim=0)
        if self.params.merge == "mean":
            merged = merged / (selected != 0).sum(dim=0).clamp(min=1)
        return base + self.params.scaling * merged
