"""SLERP: spherical interpolation between the base and one expert, tensor by tensor (mergekit's `slerp`).

For each tensor, with v0 = theta_0, v1 = theta_1 (flattened) and t (a number, a layer gradient such as
[0, 0.5, 1], or name filters): theta = sin((1-t) a)/sin(a) v0 + sin(t a)/sin(a) v1, where a is the angle between
v0 and v1; when they are nearly parallel (|cos a| > dot_threshold) it falls back to (1-t) v0 + t v1."""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field, field_validator

from mergeflow.errors import ConfigError
from mergeflow.methods.base import MergeMethod, MethodParams
from mergeflow.methods.settings import Setting, check_range, depth, layer_counts, resolve
from mergeflow.task_vectors import ExpertPool


class SlerpParams(MethodParams):
    t: Setting = Field(0.5, description="interpolation factor: 0 keeps the base, 1 the expert (a number, a layer "
                                        "gradient [a, b, ..] or name filters [{filter: s, value: v}])")
    dot_threshold: float = Field(0.9995, gt=0.0, le=1.0,
                                 description="|cos| above which the tensors count as parallel (linear fallback)")

    @field_validator("t")
    @classmethod
    def _t(cls, value: Setting) -> Setting:
        return check_range(value, "t", lambda v: -1.0 <= v <= 2.0, "[-1, 2]")


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of two fp32 tensors of one shape (the linear fallback for near-parallel ones)."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    norm_a = norm_a if norm_a > eps else torch.ones_like(norm_a)
    norm_b = norm_b if norm_b > eps else torch.ones_like(norm_b)
    dot = float(((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1))
    if abs(dot) > dot_threshold:
        return (1 - t) * v0 + t * v1
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) / math.sin(theta)) * v0 + (math.sin(t * theta) / math.sin(theta)) * v1


class Slerp(MergeMethod):
    name = "slerp"
    summary = "Spherical interpolation between the base and one expert, t per tensor (data-free, two models)."
    Params = SlerpParams
    sweep_grid = {"t": [0.25, 0.5, 0.75]}
    checks_inline = True
    prepare_is_cheap = True
    searched_by_default = False  # mergekit's: `auto` searches it when named in search.methods
    expert_count = (1, 1)

    def prepare(self, pool: ExpertPool, *, progress: bool = False) -> dict[str, Any]:
        self.check_expert_count(len(pool.experts))
        return {"layers": layer_counts(pool.float_keys())}

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: torch.Tensor,
                     state: dict[str, Any]) -> torch.Tensor:
        self.check_expert_count(len(task_vectors))
        t = resolve(self.params.t, name, depth(name, state.get("layers", {})))
        if t is None:
            raise ConfigError(f"method 'slerp': no t matches tensor {name!r} (add an entry without a filter)")
        return slerp(t, base, base + task_vectors[0], self.params.dot_threshold)
