"""The merge-method registry: a plain dict from name to class. Adding a method is one file and one line here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from mergeflow.errors import ConfigError
from mergeflow.methods.adamerging import AdaMerging
from mergeflow.methods.average import SimpleAverage
from mergeflow.methods.base import MergeMethod, MethodParams
from mergeflow.methods.breadcrumbs import Breadcrumbs, BreadcrumbsTies
from mergeflow.methods.dare import Dare
from mergeflow.methods.dare_ties import DareLinear, DareTies
from mergeflow.methods.della import Della, DellaLinear
from mergeflow.methods.doge_am import DogeAM
from mergeflow.methods.doge_ta import DogeTA
from mergeflow.methods.fisher import FisherMerging
from mergeflow.methods.iso_c import IsoC
from mergeflow.methods.iso_cts import IsoCts
from mergeflow.methods.linear import Linear
from mergeflow.methods.mats import Mats
from mergeflow.methods.model_stock import ModelStock
from mergeflow.methods.regmean import RegMean
from mergeflow.methods.slerp import Slerp
from mergeflow.methods.task_arithmetic import TaskArithmetic
from mergeflow.methods.task_arithmetic_weighted import TaskArithmeticWeighted
from mergeflow.methods.ties import Ties
from mergeflow.methods.ties_per_tensor import TiesPerTensor
from mergeflow.methods.tsv import Tsv
from mergeflow.methods.wudi import Wudi

METHODS: dict[str, type[MergeMethod]] = {
    m.name: m for m in (SimpleAverage, TaskArithmetic, Ties, Dare, Tsv, IsoC, IsoCts, Wudi, DogeTA, RegMean,
                        FisherMerging, Mats, AdaMerging, DogeAM,  # `auto` searches in this order
                        # mergekit's methods, with its per-tensor meaning and per-expert parameters
                        Linear, Slerp, ModelStock, TaskArithmeticWeighted, TiesPerTensor, DareTies, DareLinear, Della,
                        DellaLinear, Breadcrumbs, BreadcrumbsTies)
}


def method_class(name: str) -> type[MergeMethod]:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown merge method {name!r}; known methods: {', '.join(sorted(METHODS))}") from None


def build_method(name: str, params: Mapping[str, Any] | None = None) -> MergeMethod:
    """Instantiate a method with validated parameters; errors name the method and the offending parameter."""
    cls = method_class(name)
    try:
        return cls(cls.Params(**dict(params or {})))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"method {name!r}: invalid parameters: {problems}") from None


def describe_methods() -> list[dict[str, Any]]:
    """Name, summary and parameters (type, default, description, bounds or choices) of every method."""
    described = []
    for name, cls in sorted(METHODS.items()):
        params = []
        for field_name, schema in cls.Params.model_json_schema().get("properties", {}).items():
            bounds = {key: schema[key] for key in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum",
                                                    "enum") if key in schema}
            kind = schema.get("type") or ("number or list" if "anyOf" in schema else "string")
            params.append({"name": field_name, "type": kind,
                           "default": schema.get("default"), "description": schema.get("description", ""),
                           "bounds": bounds})
        described.append({"name": name, "summary": cls.summary, "params": params})
    return described


__all__ = ["METHODS", "MergeMethod", "MethodParams", "build_method", "describe_methods", "method_class"]
