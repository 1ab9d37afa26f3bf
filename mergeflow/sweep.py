"""Validation-tuned merging: coefficient grids, the shared update of scaling-only coefficients, scores and the
selection rule.

Where a method's coefficient only scales a fixed update (`MergeMethod.scaling_param`: TA's, TIES's and DARE's
lambda), the update U = merged(lambda = 1) - theta_0 is computed once per setting of the other parameters, by
running the method on a zero base, and each lambda gives theta_0 + lambda U with the very operations the method
uses: bit-identical to a fresh merge. Other coefficients (DOGE's eta) need a merge per point.
Scores read validation data only; the caller evaluates the chosen point on test.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from mergeflow.checkpoints import TensorInfo
from mergeflow.errors import ConfigError
from mergeflow.methods import METHODS, build_method, method_class
from mergeflow.methods.base import with_inputs
from mergeflow.plots import save_figure
from mergeflow.selection import is_float
from mergeflow.task_vectors import ExpertPool

Rule = Literal["norm_acc.avg", "acc.avg", "floor"]

# each method declares its own (`MergeMethod.sweep_grid`, in the method's file)
DEFAULT_GRIDS: dict[str, dict[str, list[Any]]] = {
    name: dict(cls.sweep_grid) for name, cls in METHODS.items() if cls.sweep_grid is not None}


def default_grid(method: str) -> dict[str, list[Any]]:
    if method not in DEFAULT_GRIDS:
        raise ConfigError(f"method {method!r} has no default sweep grid; give one (e.g. sweep: {{param: [..]}}); "
                          f"defaults exist for {', '.join(sorted(DEFAULT_GRIDS))}")
    return {k: list(v) for k, v in DEFAULT_GRIDS[method].items()}


def grid_points(method: str, grid: Mapping[str, Sequence[Any]], fixed: Mapping[str, Any] | None = None
                ) -> list[dict[str, Any]]:
    """Every combination of `grid` (its keys' order; values sorted) over the `fixed` parameters, each validated."""
    if not grid or any(not values for values in grid.values()):
        raise ConfigError(f"sweep of {method!r}: the grid needs at least one value per parameter")
    fixed = dict(fixed or {})
    if clash := sorted(set(grid) & set(fixed)):
        raise ConfigError(f"sweep of {method!r}: {clash} both fixed in params and swept")
    keys = list(grid)
    points = []
    for values in itertools.product(*(sorted(set(grid[k])) for k in keys)):
        params = {**fixed, **dict(zip(keys, values))}
        build_method(method, params)  # a clear error naming the bad value
        points.append(params)
    return points


def update_key(method: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters that fix a method's update: all but its scaling coefficient."""
    scaling = method_class(method).scaling_param
    return {k: v for k, v in params.items() if k != scaling}


def scaled_update(method: str, params: Mapping[str, Any], pool: ExpertPool, state: dict[str, Any] | None = None
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, U) with U = merged - theta_0 at scaling 1 (fp32, CPU), for each float tensor in `update_plan`'s order,
    one at a time (a caller that writes each away holds one tensor, not the whole update), for a method with
    `scaling_param`; `state`: the method's global pass when already computed (the sparsify stage's)."""
    scaling = method_class(method).scaling_param
    if scaling is None:
        raise ConfigError(f"method {method!r} has no scaling-only coefficient to sweep by rescaling")
    merge = build_method(method, {**update_key(method, params), scaling: 1.0})
    state = with_inputs(merge.prepare(pool) if state is None else state, pool)
    return ((name, merge.merge_tensor(name, torch.zeros_like(base), task_vectors, state).cpu())
            for name, base, task_vectors in pool.stream())


def update_plan(pool: ExpertPool) -> list[TensorInfo]:
    """The tensors `scaled_update` yields: each float tensor of the base, in fp32."""
    return [replace(info, dtype=torch.float32) for info in pool.infos() if is_float(info.dtype)]


def scaled_tensor(base: torch.Tensor, update: Callable[[], torch.Tensor], scaling: float) -> torch.Tensor:
    """theta_0 + scaling * U of one tensor in the base's dtype, as the method computes it (a non-float tensor is
    carried over; its U is never read)."""
    if not is_float(base.dtype):
        return base
    return (base.to(torch.float32) + scaling * update()).to(base.dtype)


def apply_update(base: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor], scaling: float
                 ) -> dict[str, torch.Tensor]:
    """theta_0 + scaling * U in the base's dtypes; non-float tensors carried over."""
    return {name: scaled_tensor(tensor, lambda name=name: update[name], scaling) for name, tensor in base.items()}


class ScaledPoint(Mapping[str, torch.Tensor]):
    """theta_0 + scaling * U as a read-only mapping computed one tensor at a time from two sources with `keys()` and
    `get(name)` (an open checkpoint, a safetensors file): the engine writes such a point, or a sweep builds its
    model, without the base, U and the point in memory at once; each tensor bit-identical to `apply_update`'s.
    `close()` closes both sources."""

    def __init__(self, base: Any, update: Any, scaling: float):
        self.base, self.update, self.scaling = base, update, scaling
        self._keys = list(base.keys())
        self._known = set(self._keys)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._known:
            raise KeyError(name)
        return scaled_tensor(self.base.get(name), lambda: self.update.get(name), self.scaling)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def close(self) -> None:
        for source in (self.base, self.update):
            if hasattr(source, "close"):
                source.close()


def merged_point(method: str, params: Mapping[str, Any], base: Mapping[str, torch.Tensor] | None,
                 shared_update: Callable[[], Mapping[str, torch.Tensor]] | None, pool: ExpertPool | None,
                 state: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The merged state dict of one grid point, in memory: theta_0 (`base`) + lambda U for a method with a
    scaling-only coefficient (U from `shared_update()`, computed once per setting of the other parameters by the
    caller), else a full merge of `pool` (with the method's global pass `state` when already computed). The flow's
    sweep stage streams the same points to disk instead (`write_point`, `scaled_update`)."""
    from mergeflow.merge import merge_pool

    chosen = build_method(method, params)
    scaling = method_class(method).scaling_param
    if scaling is None:
        out: dict[str, torch.Tensor] = {}
        merge_pool(chosen, pool, out.__setitem__, state=state)
        return out
    return apply_update(base, shared_update(), float(chosen.params.model_dump()[scaling]))


def write_point(method: str, params: Mapping[str, Any], pool: ExpertPool, writer: Any,
                state: dict[str, Any] | None = None) -> None:
    """One grid point's full merge of `pool` (with the method's global pass `state` when already computed), each
    tensor handed to `writer` (`mergeflow.checkpoints.ShardedSafetensorsWriter`) as the merge produces it, as the
    engine writes a merge: what the flow's sweep stage keeps of a point that is not a rescaled update."""
    from mergeflow.merge import merge_pool

    merge_pool(build_method(method, params), pool, writer.write, state=state, patch=writer.patch,
               write_rows=writer.write_rows)


@dataclass(frozen=True)
class PointScore:
    params: dict[str, Any]
    accuracy: dict[str, float]  # validation accuracy per task
    normalized: dict[str, float]  # over each expert's validation accuracy
    score: float  # what the rule maximises (-inf when a floor is missed)

    @property
    def avg(self) -> float:
        return sum(self.accuracy.values()) / len(self.accuracy)

    @property
    def norm_avg(self) -> float:
        return sum(self.normalized.values()) / len(self.normalized)


def score_point(params: Mapping[str, Any], accuracy: Mapping[str, float], expert_accuracy: Mapping[str, float],
                rule: Rule = "norm_acc.avg", floor: float = 0.0) -> PointScore:
    """Score one point: average normalized accuracy (default), average accuracy, or, with "floor", the average
    normalized accuracy among points whose every task reaches `floor` normalized accuracy (else -inf)."""
    normalized = {t: a / expert_accuracy[t] if expert_accuracy[t] > 0 else 0.0 for t, a in accuracy.items()}
    norm_avg = sum(normalized.values()) / len(normalized)
    if rule == "acc.avg":
        score = sum(accuracy.values()) / len(accuracy)
    elif rule == "floor" and min(normalized.values()) < floor:
        score = -math.inf
    else:
        score = norm_avg
    return PointScore(dict(params), dict(accuracy), normalized, score)


def choose(points: Sequence[PointScore], swept: Sequence[str]) -> PointScore:
    """The best-scoring point; ties go to the smaller coefficients (compared in the grid's parameter order)."""
    if not points:
        raise ConfigError("sweep: no grid point was scored")
    return min(points, key=lambda p: (-p.score, [p.params[k] for k in swept]))


def plot_sweep(points: Sequence[PointScore], swept: Sequence[str], path: Path, title: str) -> Path:
    """Validation accuracy against the grid point: a line per task and the average (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted(points, key=lambda p: [p.params[k] for k in swept])
    numeric = len(swept) == 1 and all(isinstance(p.params[swept[0]], (int, float)) for p in order)
    xs = [p.params[swept[0]] for p in order] if numeric else list(range(len(order)))
    fig, ax = plt.subplots(figsize=(7, 4))
    for task in order[0].accuracy:
        ax.plot(xs, [100 * p.accuracy[task] for p in order], marker="o", linewidth=1, label=task)
    ax.plot(xs, [100 * p.avg for p in order], marker="s", linewidth=2.5, color="black", label="average")
    if numeric:
        ax.set_xlabel(swept[0])
    else:
        ax.set_xticks(xs, [", ".join(f"{k}={p.params[k]}" for k in swept) for p in order], rotation=60,
                      ha="right", fontsize=7)
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)
