"""Iso-C (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
Subspaces", ICML 2025): per 2-D layer, the summed task vector M = sum_i tau_i with its spectrum flattened to the
mean singular value: Delta = mean(s) U Vh for M = U diag(s) Vh; merged = theta_0 + alpha * Delta.
Other tensors (biases, norms, 4-D convolutions) and `exclude`d ones: theta_0 + alpha * mean tau.

As FusionBench's `iso_c` and the authors' code (FusionBench's config: alpha 1.0, its docs run 1.5 on ViT-B/32;
the paper picks alpha on validation from {0.1, ..., 3.0}).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from mergeflow.methods.base import ExcludeParams, PerLayerMethod, stored_factors
from mergeflow.subspace import top_singular


class IsoParams(ExcludeParams):
    alpha: float = Field(1.0, ge=0.0, le=10.0, description="scales the whole update (1: FusionBench's config; "
                         "its docs use 1.5 on ViT-B/32; the paper picks it on validation from 0.1-3.0)")


def sum_factors(task_vectors: torch.Tensor, factors: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
    """(u [m, r], s [r], vh [r, n]): the thin SVD of one layer's summed task vector, read from the subspace
    stage's `factors` when given, else computed."""
    if factors is not None:
        return tuple(factors[key].to(task_vectors.device) for key in ("u", "s", "vh"))
    return top_singular(task_vectors.sum(dim=0), min(task_vectors.shape[1:]))


def iso_c_update(task_vectors: torch.Tensor, factors: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Delta [m, n] of one layer's task vectors [T, m, n]."""
    u, s, vh = sum_factors(task_vectors, factors)
    return s.mean() * (u @ vh)


class IsoC(PerLayerMethod):
    name = "iso_c"
    summary = "Iso-C: the summed task vector with a flat (isotropic) spectrum, per layer (data-free)."
    Params = IsoParams
    sweep_grid = {"alpha": [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]}
    scaling_param = "alpha"

    def subspace_kinds(self) -> tuple[str, ...]:
        return ("sum",)

    def layer_update(self, name: str, task_vectors: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        return iso_c_update(task_vectors, stored_factors(state, "sum", name))
