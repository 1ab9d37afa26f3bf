"""DARE-TIES (Yu et al., 2024, as mergekit runs it): each task-vector entry kept with probability d (per tensor,
rescaled to the tensor's L1 norm), then TIES's sign election; `dare_linear` skips the election. Mergeflow's own
`dare` rescales by 1/d instead."""

from __future__ import annotations

from pydantic import Field

from mergeflow.methods.gta import GeneralizedTaskArithmetic, RandomParams
from mergeflow.methods.settings import Setting


class DareTiesParams(RandomParams):
    density: Setting = Field(0.5, description="probability d of keeping each task-vector entry")
    rescale: bool = Field(True, description="rescale kept entries to the tensor's L1 norm")


class DareTies(GeneralizedTaskArithmetic):
    name = "dare_ties"
    summary = "Random drop (L1 rescale), sign election, weighted sum (mergekit's dare_ties; data-free)."
    Params = DareTiesParams
    sweep_grid = {"density": [0.3, 0.5, 0.7], "scaling": [0.3, 0.5, 0.7, 1.0]}
    sparsification = "random"
    consensus = True


class DareLinear(DareTies):
    name = "dare_linear"
    summary = "Random drop (L1 rescale), weighted sum without sign election (mergekit's dare_linear; data-free)."
    consensus = False
