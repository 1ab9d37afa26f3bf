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
from mergeflow.methods.iso_c import IsoParams, sum_factors
from mergeflow.subspace import assemble_isotropic, iso_cts_sizes, top_singular


class IsoCtsParams(IsoParams):
    common_space_fraction: float = Field(0.8, gt=0.0, le=1.0, description="share of each layer's rank given to "
                                         "the common subspace (rounded so the task-specific rest splits evenly)")


def iso_cts_update(task_vectors: torch.Tensor, common_fraction: float,
                   factors: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Delta [m, n] of one layer's task vectors [T, m, n]."""
    tasks, m, n = task_vectors.shape
    r = min(m, n)
    common, per_task = iso_cts_sizes(r, tasks, common_fraction)
    u, s, vh = sum_factors(task_vectors, factors)
    uc = u[:, :common]
    u_all, s_all, vh_all = [], [], []
    for tv in task_vectors:
        residual = tv - uc @ (uc.mT @ tv)
        ui, si, vi = top_singular(residual, per_task)
        u_all.append(ui), s_all.append(si), vh_all.append(vi)
    u_all.append(uc), s_all.append(s[:common]), vh_all.append(vh[:common])
    return assemble_isotropic(torch.cat(u_all, dim=1), torch.cat(s_all), torch.cat(vh_all))


class IsoCts(PerLayerMethod):
    name = "iso_cts"
    summary = "Iso-CTS: common plus task-specific subspaces with a flat spectrum, per layer (data-free)."
    Params = IsoCtsParams
    scaling_param = "alpha"

    def subspace_kinds(self) -> tuple[str, ...]:
        return ("sum",)

    def layer_update(self, name: str, task_vectors: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        return iso_cts_update(task_vectors, self.params.common_space_fraction, stored_factors(state, "sum", name))
