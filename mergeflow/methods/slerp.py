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


_CHUNK = 1 << 20  # entries per float64 partial sum


def slerp_coefficients(t: float, v0: torch.Tensor, tau: torch.Tensor, dot_threshold: float = 0.9995,
                       eps: float = 1e-8) -> tuple[float, float]:
    """(c0, c1) with slerp = c0 v0 + c1 v1, v1 = v0 + tau: the norms and the cosine from float64 partial sums
    (fp32 sums over millions of entries lose digits that acos near cos = 1 magnifies); the linear fallback
    (1 - t, t) for near-parallel tensors."""
    a, d = v0.reshape(-1), tau.reshape(-1)
    aa = ad = dd = 0.0
    for start in range(0, a.numel(), _CHUNK):
        x, y = a[start:start + _CHUNK].double(), d[start:start + _CHUNK].double()
        aa, ad, dd = aa + float(x @ x), ad + float(x @ y), dd + float(y @ y)
    norm_a, norm_b = math.sqrt(aa), math.sqrt(max(aa + 2 * ad + dd, 0.0))
    norm_a, norm_b = norm_a if norm_a > eps else 1.0, norm_b if norm_b > eps else 1.0
    cos = max(-1.0, min(1.0, (aa + ad) / (norm_a * norm_b)))
    if abs(cos) > dot_threshold:
        return 1.0 - t, t
    theta = math.acos(cos)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical interpolation of two tensors of one shape (the linear fallback for near-parallel ones)."""
    tau = v1 - v0
    c0, c1 = slerp_coefficients(t, v0, tau, dot_threshold)
    return torch.add(v0 * (c0 + c1), tau, alpha=c1)


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
        c0, c1 = slerp_coefficients(t, base, task_vectors[0], self.params.dot_threshold)
        # c0 v0 + c1 (v0 + tau), scaling tau in the engine's buffer (read no more after this call; the result is a
        # tensor of its own: the engine reuses that buffer)
        return torch.add(task_vectors[0].mul_(c1), base, alpha=c0 + c1)
