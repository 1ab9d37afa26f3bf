"""TSV-M (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025):
per 2-D layer, each task keeps its top int(r / T) singular triplets; the stacked left and right bases are
orthogonalised (polar factors, which removes the interference between tasks' directions) and recombined with
the kept singular values: Delta = polar(U) diag(s) polar(Vh); merged = theta_0 + alpha * Delta.
Other tensors (biases, norms, 4-D convolutions) and `exclude`d ones: theta_0 + alpha * mean tau.

As FusionBench's `TaskSingularVectorMerging` (alpha 1, every 2-D tensor) and the authors' code; the paper picks
alpha on validation from {0.1, ..., 3.0}. A layer with r < T keeps no triplet (Delta = 0), as the reference.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from mergeflow.methods.base import ExcludeParams, PerLayerMethod, stored_factors
from mergeflow.subspace import polar, top_singular, tsv_rank


class TsvParams(ExcludeParams):
    alpha: float = Field(1.0, ge=0.0, le=10.0, description="scales the whole update (1: FusionBench's default; "
                         "the paper picks it on validation from 0.1-3.0)")


def tsv_update(task_vectors: torch.Tensor, factors: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Delta [m, n] of one layer's task vectors [T, m, n]: from each task's top int(r/T) triplets (computed, or
    read from `factors`: stacked `u` [T, m, k], `s` [T, k], `vh` [T, k, n] of at least that rank)."""
    tasks, m, n = task_vectors.shape
    k = tsv_rank(min(m, n), tasks)
    if k == 0:
        return torch.zeros_like(task_vectors[0])
    if factors is None:
        triplets = [top_singular(tv, k) for tv in task_vectors]
        u, s, vh = (torch.stack(part) for part in zip(*triplets))
    else:
        u, s, vh = factors["u"][..., :k], factors["s"][..., :k], factors["vh"][..., :k, :]
    u = u.to(task_vectors.device).transpose(0, 1).reshape(m, tasks * k)  # task i in columns [i k, (i+1) k)
    vh = vh.to(task_vectors.device).reshape(tasks * k, n)
    return (polar(u) * s.to(task_vectors.device).reshape(-1)) @ polar(vh)


class Tsv(PerLayerMethod):
    name = "tsv"
    summary = "TSV-M: per-layer top task singular vectors, orthogonalised, recombined (data-free)."
    Params = TsvParams
    # the papers pick alpha on validation from 0.1-3.0; FusionBench runs 1.0 (1.5 in its Iso docs); on the demo's
    # text tasks the best alpha was 2.0 or more for TSV-M, Iso-C and Iso-CTS
    sweep_grid = {"alpha": [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]}
    scaling_param = "alpha"

    def subspace_kinds(self) -> tuple[str, ...]:
        return ("task",)

    def layer_update(self, name: str, task_vectors: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        return tsv_update(task_vectors, stored_factors(state, "task", name))
