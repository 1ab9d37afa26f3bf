"""SLERP: spherical interpolation between the base and one expert, tensor by tensor (mergekit's `slerp`).

For each tensor, with v0 = theta_0, v1 = theta_1 (flattened) and t (a number, a layer gradient such as
[0, 0.5, 1], or name filters): theta = sin((1-t) a)/sin(a) v0 + sin(t a)/sin(a) v1, where a is the angle between
v0 and v1; when they are nearly parallel (|cos a| > dot_threshold) it falls back to (1-t) v0 + t v1.
A two-pass method: the norms and the dot (float64 sums of exact products, tile by tile) first, then the output, so
a tensor larger than the engine's window comes in blocks of rows, twice."""

from __future__ import annotations

import math
import threading
from typing import Any

import torch
from pydantic import Field, field_validator

from mergeflow.errors import ConfigError
from mergeflow.methods.base import (TENSOR_SUMS, MergeMethod, MethodParams, sum_parts, tile_columns,
                                    tile_rows)
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


def slerp_tile_sums(v0: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """float64 [tiles, 4]: the Gram matrix (|v0|^2, v0 . tau, tau . v0, |tau|^2) of each tile of `tile_rows` rows,
    from exact float64 products of the fp32 values (fp32 sums over millions of entries lose digits that acos near
    cos = 1 magnifies). Tiles start at multiples of `tile_rows`, so a block of rows that starts at one (the engine's)
    sums as in the whole tensor."""
    a = v0.reshape(v0.shape[0] if v0.dim() >= 2 else 1, -1)
    d = tau.reshape(a.shape)
    rows, width = a.shape
    step, cols = tile_rows(v0.shape), tile_columns(v0.shape)
    out = torch.zeros((-(-rows // step), 4), dtype=torch.float64, device=a.device)
    pair = _pair_buffer(min(step, rows) * cols, a.device)
    for tile, row in enumerate(range(0, rows, step)):
        n = min(step, rows - row)
        for col in range(0, width, cols):
            m = min(cols, width - col)
            x = pair[:, :n * m]
            x[0].view(n, m).copy_(a[row:row + n, col:col + m])
            x[1].view(n, m).copy_(d[row:row + n, col:col + m])
            out[tile].view(2, 2).addmm_(x, x.T)
    return out


_pairs = threading.local()  # each thread's float64 tile buffer (4 MB), kept: fresh pages per tensor cost more


def _pair_buffer(numel: int, device: torch.device) -> torch.Tensor:
    buffer = getattr(_pairs, "buffer", None)
    if buffer is None or buffer.shape[1] < numel or buffer.device != device:
        buffer = _pairs.buffer = torch.empty((2, numel), dtype=torch.float64, device=device)
    return buffer


def slerp_coefficients(t: float, sums: torch.Tensor, dot_threshold: float = 0.9995,
                       eps: float = 1e-8) -> tuple[float, float]:
    """(c0, c1) with slerp = c0 v0 + c1 v1, v1 = v0 + tau, from the totals (the Gram matrix of v0 and tau) of
    `slerp_tile_sums`; the linear fallback (1 - t, t) for near-parallel tensors."""
    aa, ad, _, dd = (float(x) for x in sums)
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
    c0, c1 = slerp_coefficients(t, sum_parts([slerp_tile_sums(v0, tau)]), dot_threshold)
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
    two_pass = True  # the norms and the dot first, then the output block by block

    def prepare(self, pool: ExpertPool, *, progress: bool = False) -> dict[str, Any]:
        self.check_expert_count(len(pool.experts))
        return {"layers": layer_counts(pool.float_keys())}

    def block_sums(self, name: str, base: torch.Tensor, task_vectors: torch.Tensor,
                   state: dict[str, Any]) -> torch.Tensor:
        return slerp_tile_sums(base, task_vectors[0])

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: torch.Tensor,
                     state: dict[str, Any]) -> torch.Tensor:
        """c0 v0 + c1 (v0 + tau) in fp32, computed in the engine's task-vector buffer, which it returns: the engine
        copies it into the output dtype before it reuses the buffer. A block of rows takes the totals in
        state[TENSOR_SUMS]."""
        self.check_expert_count(len(task_vectors))
        t = resolve(self.params.t, name, depth(name, state.get("layers", {})))
        if t is None:
            raise ConfigError(f"method 'slerp': no t matches tensor {name!r} (add an entry without a filter)")
        sums = state.get(TENSOR_SUMS)
        sums = sum_parts([self.block_sums(name, base, task_vectors, state)]) if sums is None else sums
        c0, c1 = slerp_coefficients(t, sums, self.params.dot_threshold)
        return task_vectors[0].mul_(c1).add_(base, alpha=c0 + c1)
