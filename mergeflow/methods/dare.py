"""DARE (Yu et al., 2024): drop each task-vector entry with probability p, rescale survivors by 1/(1-p) (which
keeps the expectation), then merge by Task Arithmetic. Masks are seeded per (seed, task, tensor), so results do
not depend on device or processing order. (mergekit instead rescales to match each tensor's L1 norm.)"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from mergeflow.methods.base import BLOCK_OFFSET, MergeMethod, MethodParams
from mergeflow.parallel import parallel_map
from mergeflow.sparsify import dare_keep_mask


class DareParams(MethodParams):
    drop_rate: float = Field(0.5, ge=0.0, lt=1.0, description="probability p of dropping each task-vector entry")
    scaling: float = Field(0.3, ge=0.0, le=10.0, description="lambda applied to the sum of the sparsified vectors")
    rescale: bool = Field(True, description="multiply survivors by 1/(1-p)")
    seed: int = Field(0, description="seed of the random drop masks")


class Dare(MergeMethod):
    name = "dare"
    summary = "Random drop with rescale, then Task Arithmetic (data-free)."
    Params = DareParams
    sweep_grid = {"drop_rate": [0.3, 0.5, 0.7], "scaling": [0.3, 0.5, 0.7, 1.0]}
    scaling_param = "scaling"
    checks_inline = True
    elementwise = True

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: torch.Tensor,
                     state: dict[str, Any]) -> torch.Tensor:
        p = self.params
        offset = state.get(BLOCK_OFFSET, 0)
        masks = parallel_map(lambda i: dare_keep_mask(base.shape, p.drop_rate, p.seed, i, name, offset),
                             range(len(task_vectors)))  # the random draws dominate: one task per core
        total = torch.zeros_like(base)
        for tv, keep in zip(task_vectors, masks):
            total += tv * keep.to(tv.device)
        if p.rescale and p.drop_rate > 0:
            total /= 1.0 - p.drop_rate
        return base + p.scaling * total
