"""Model Breadcrumbs (Davari & Belilovsky, 2024, as mergekit runs it): per tensor, drop the largest gamma fraction
of |values| (outliers) and the smallest, keeping a fraction d, then the weighted sum; `breadcrumbs_ties` adds TIES's
sign election."""

from __future__ import annotations

from pydantic import Field, field_validator

from mergeflow.methods.gta import GeneralizedTaskArithmetic, SparseParams
from mergeflow.methods.settings import Setting, check_range


class BreadcrumbsParams(SparseParams):
    density: Setting = Field(0.9, description="fraction of each tensor's entries kept")
    gamma: Setting = Field(0.01, description="fraction of the largest |values| dropped as outliers")

    @field_validator("gamma")
    @classmethod
    def _gamma(cls, value: Setting) -> Setting:
        return check_range(value, "gamma", lambda v: 0.0 <= v < 1.0, "[0, 1)")


class Breadcrumbs(GeneralizedTaskArithmetic):
    name = "breadcrumbs"
    summary = "Drop the largest and the smallest magnitudes per tensor, weighted sum (mergekit's breadcrumbs)."
    Params = BreadcrumbsParams
    sweep_grid = {"density": [0.8, 0.9], "gamma": [0.01, 0.05], "scaling": [0.3, 0.5, 0.7, 1.0]}
    sparsification = "outliers"


class BreadcrumbsTies(Breadcrumbs):
    name = "breadcrumbs_ties"
    summary = "Breadcrumbs' drop, then TIES's sign election (mergekit's breadcrumbs_ties; data-free)."
    consensus = True
