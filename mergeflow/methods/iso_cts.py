"""Iso-CTS (Marczak et al., ICML 2025): Iso-C with task-specific subspaces. Per 2-D layer of rank r: the top c
singular directions of the summed task vector (the common subspace, c about `common_space_fraction` r) plus,
for each task, the top n_t directions of its task vector with the common subspace projected out (c + T n_t = r);
the stacked bases are orthogonalised (polar factors) and every direction gets the mean of all r singular values:
Delta = mean(s) polar(U) polar(Vh); merged = theta_0 + alpha * Delta. Other tensors and `exclude`d ones:
theta_0 + alpha * mean tau.

As FusionBench's `iso_cts` and the authors' code (common_space_fraction 0.8; alpha as for Iso-C).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from mergeflow.methods.base import PerLayerMethod, stored_factors
from mergeflow.methods.iso_c import IsoParams
from mergeflow.subspace import assemble_isotropic, cts_kind, iso_cts_bases


class IsoCtsParams(IsoParams):
    common_space_fraction: float = Field(0.8, gt=0.0, le=1.0, description="share of each layer's rank given to "
                                         "the common subspace (rounded so the task-specific rest splits evenly)")


def iso_cts_update(task_vectors: torch.Tensor, common_fraction: float,
                   factors: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Delta [m, n] of one layer's task vectors [T, m, n], from its stacked bases (`factors`: the subspace stage's
    kind `cts-<fraction>`, else computed here)."""
    if factors is None:
        u, s, vh = iso_cts_bases(task_vectors, common_fraction)
    else:
        u, s, vh = (factors[key].to(task_vectors.device) for key in ("u", "s", "vh"))
    return assemble_isotropic(u, s, vh)


class IsoCts(PerLayerMethod):
    name = "iso_cts"
    summary = "Iso-CTS: common plus task-specific subspaces with a flat spectrum, per layer (data-free)."
    Params = IsoCtsParams
    sweep_grid = {"alpha": [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]}
    scaling_param = "alpha"

    def subspace_kinds(self) -> tuple[str, ...]:
        return (cts_kind(self.params.common_space_fraction),)

    def layer_update(self, name: str, task_vectors: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        fraction = self.params.common_space_fraction
        return iso_cts_update(task_vectors, fraction, stored_factors(state, cts_kind(fraction), name))
