"""DELLA (Deep et al., 2024, as mergekit runs it): MagPrune keeps each entry with a probability from d - epsilon (the
smallest magnitudes of its row) to d + epsilon (the largest), rescaled to the tensor's L1 norm, then TIES's sign
election and the weight-normalised sum; `della_linear` skips the election and the normalisation."""

from __future__ import annotations

from pydantic import Field, field_validator

from mergeflow.methods.gta import GeneralizedTaskArithmetic, RandomParams
from mergeflow.methods.settings import Setting, check_range


class DellaParams(RandomParams):
    density: Setting = Field(0.5, description="mean probability d of keeping an entry")
    epsilon: Setting = Field(0.15, description="spread of the keep probabilities by magnitude rank: d +/- epsilon")
    normalize: bool = Field(True, description="divide by the sum of the weights of the agreeing entries")
    rescale: bool = Field(True, description="rescale kept entries to the tensor's L1 norm")

    @field_validator("epsilon")
    @classmethod
    def _epsilon(cls, value: Setting) -> Setting:
        return check_range(value, "epsilon", lambda v: 0.0 <= v < 0.5, "[0, 0.5)")


class Della(GeneralizedTaskArithmetic):
    name = "della"
    summary = "Magnitude-ranked random drop (MagPrune), sign election, normalised sum (mergekit's della; data-free)."
    Params = DellaParams
    sweep_grid = {"density": [0.3, 0.5, 0.7], "scaling": [0.5, 1.0, 1.5]}
    sparsification = "rank"
    consensus = True


class DellaLinearParams(DellaParams):
    normalize: bool = Field(False, description="divide by the sum of the weights")


class DellaLinear(Della):
    name = "della_linear"
    summary = "MagPrune drop, weighted sum without sign election (mergekit's della_linear; data-free)."
    Params = DellaLinearParams
    consensus = False
