"""MaTS (Tam, Bansal & Raffel, 2024): match every expert in its task parameter subspace by solving
(sum_i C_i) theta = sum_i C_i theta_i with conjugate gradient (`mergeflow.solvers`), from an initialisation.

Objectives (C_i), per parameter with statistics, in the [in, out] layout for linear weights W (an nn.Linear
weight is transposed to it; one the statistics list as stored [in, out], GPT-2's Conv1D, already is):
- "fisher_diag": C_i = diag(F_i) (`::fisher`), one system per tensor;
- "regmean":     C_i = I (x) A_i, i.e. sum_i A_i W = sum_i A_i W_i (`::gram_in`);
- "kfac":        the K-FAC block Fisher A_i (x) G_i, i.e. sum_i A_i W G_i = sum_i A_i W_i G_i (`::gram_in`,
                 `::gram_out`); no closed form for N > 1. The default, as the MaTS full-model runs.
`model_lambda` shrinks the off-diagonals of every Gram, A <- lambda A + (1 - lambda) diag(A). CG starts from
Task Arithmetic (lambda 0.3), the average or the pretrained weights and stops at `max_iter` or at a relative
residual `tol`; as in MaTS, an early stop keeps the solution near the initialisation. Coordinates the summed
statistic does not reach (zero Fisher, zero Gram diagonal) take the average rather than staying at the start (the
released MaTS code leaves zero-Fisher coordinates at 0); parameters without statistics are averaged.
The solvers take a leading layer dimension: the engine hands same-shaped covered tensors over in groups
(`group_mb`), solved as one batched CG (each system stops on its own residual).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from mergeflow.methods.base import RUN_ONLY, MethodParams, resume_for
from mergeflow.methods.data_aware import DataAwareMethod, shrink_off_diagonal
from mergeflow.solvers import CGResult, conjugate_gradient
from mergeflow.statistics import FISHER, GRAM_IN, GRAM_OUT

log = logging.getLogger(__name__)

Objective = Literal["fisher_diag", "regmean", "kfac"]
KINDS: dict[str, tuple[str, ...]] = {"fisher_diag": (FISHER,), "regmean": (GRAM_IN,), "kfac": (GRAM_IN, GRAM_OUT)}


def solve_fisher_diag(thetas: Tensor, fisher: Tensor, x0: Tensor, **cg: Any) -> tuple[Tensor, CGResult]:
    """thetas, fisher [L, N, *shape]; x0 [L, *shape]. Zero-Fisher coordinates take the average."""
    total = fisher.sum(dim=1)
    start = torch.where(total == 0, thetas.mean(dim=1), x0)  # stays there: the operator is 0 on those coordinates
    result = conjugate_gradient(lambda v: total * v, (fisher * thetas).sum(dim=1), start, **cg)
    return result.x, result


def _linear_matvec(grams_in: Tensor, grams_out: Tensor | None) -> Callable[[Tensor], Tensor]:
    if grams_out is None:
        total = grams_in.sum(dim=1)
        return lambda v: total @ v
    return lambda v: (grams_in @ v.unsqueeze(1) @ grams_out).sum(dim=1)


def solve_linear(thetas: Tensor, grams_in: Tensor, grams_out: Tensor | None, x0: Tensor,
                 **cg: Any) -> tuple[Tensor, CGResult]:
    """The RegMean (grams_out None) or K-FAC objective for linear weights.

    thetas [L, N, out, in] (nn.Linear layout), grams_in [L, N, in, in], grams_out [L, N, out, out],
    x0 [L, out, in]; returns [L, out, in]. Input rows / output columns with a zero summed Gram diagonal start,
    and so stay, at the average (CG never moves a start along the null space of the operator).
    """
    experts = thetas.transpose(-1, -2)  # [L, N, in, out]
    rhs = grams_in @ experts
    if grams_out is not None:
        rhs = rhs @ grams_out
    free = (torch.diagonal(grams_in.sum(dim=1), dim1=-2, dim2=-1) == 0).unsqueeze(-1)  # [L, in, 1]
    if grams_out is not None:
        free = free | (torch.diagonal(grams_out.sum(dim=1), dim1=-2, dim2=-1) == 0).unsqueeze(-2)
    start = torch.where(free, experts.mean(dim=1), x0.transpose(-1, -2))
    result = conjugate_gradient(_linear_matvec(grams_in, grams_out), rhs.sum(dim=1), start, **cg)
    return result.x.transpose(-1, -2), result


SOLVES = RUN_ONLY + "solves"  # state key: each solved tensor's iterations, residual, convergence, seconds


class MatsParams(MethodParams):
    objective: Objective = Field("kfac", description="C_i: fisher_diag, regmean (input Gram) or kfac (A_i x G_i)")
    init: Literal["task_arithmetic", "average", "pretrained"] = Field(
        "task_arithmetic", description="CG starting point")
    init_scaling: float = Field(0.3, ge=0.0, le=10.0, description="lambda of the task_arithmetic start")
    model_lambda: float = Field(1.0, ge=0.0, le=1.0,
                                description="off-diagonal shrink of every Gram: lambda A + (1 - lambda) diag(A)")
    max_iter: int = Field(100, ge=1, le=100_000, description="CG iteration cap per tensor")
    tol: float = Field(1e-6, ge=0.0, description="stop when ||b - M x|| <= tol * ||b||")
    precision: Literal["float32", "float64"] = Field("float32", description="dtype CG runs in")
    group_mb: float | None = Field(None, ge=0.0, le=1e6, description="cap (MB) on the stacked task vectors of "
                                   "one batch of same-shape tensors solved together; 0: one at a time; "
                                   "default: 256 on a GPU, 0 on the CPU")


class Mats(DataAwareMethod):
    name = "mats"
    summary = "Conjugate-gradient merge in each task's parameter subspace (needs statistics: see objective)."
    Params = MatsParams
    # auto: its defaults only: a grid over its initialisation scored identically on the demo's tasks, at about
    # 85 s of CG per point (its 100 iterations stop well short of the exact solution)
    search_grid = {}
    fidelity = ("max_iter",)  # the CG iteration cap: `auto`'s early rungs run fewer

    def statistic_kinds(self) -> tuple[str, ...]:
        return KINDS[self.params.objective]

    def _start(self, base: Tensor, task_vectors: Tensor) -> Tensor:
        if self.params.init == "task_arithmetic":
            return base + self.params.init_scaling * task_vectors.sum(dim=0)
        if self.params.init == "average":
            return base + task_vectors.mean(dim=0)
        return base

    def grouping(self, state: dict[str, Any], device: torch.device) -> tuple[Sequence[str], int]:
        group_mb = self.params.group_mb
        if group_mb is None:
            group_mb = 0.0 if device.type == "cpu" else 256.0
        return state["covered"], int(group_mb * 1e6)

    def merge_tensor(self, name: str, base: Tensor, task_vectors: Tensor, state: dict[str, Any]) -> Tensor:
        if name not in state["covered"]:
            return base + task_vectors.mean(dim=0)
        return self.merge_group([name], base[None], task_vectors[None], state)[0]

    def merge_group(self, names: Sequence[str], bases: Tensor, task_vectors: Tensor,
                    state: dict[str, Any]) -> Tensor:
        """Solve G same-shape covered tensors (bases [G, *shape], task vectors [G, N, *shape]) as one batch."""
        started = time.perf_counter()
        p = self.params
        in_out = [self.in_out(name, state) for name in names] if p.objective != "fisher_diag" else []
        if any(in_out) and not all(in_out):  # both layouts in one group of equal shapes: each layout on its own
            merged = torch.empty_like(bases)
            for layout in (True, False):
                index = [g for g, flag in enumerate(in_out) if flag == layout]
                merged[index] = self.merge_group([names[g] for g in index], bases[index], task_vectors[index], state)
            return merged
        if any(in_out):  # solved in nn.Linear's [out, in] layout, handed back [in, out]
            bases, task_vectors = bases.transpose(-2, -1), task_vectors.transpose(-2, -1)
        dtype = getattr(torch, p.precision)
        cg = {"max_iter": p.max_iter, "tol": p.tol, "dtype": dtype, "resume": resume_for(state, names)}
        thetas = (bases.unsqueeze(1) + task_vectors).to(dtype)
        x0 = torch.stack([self._start(b, tv) for b, tv in zip(bases, task_vectors)]).to(dtype)

        def stacked(kind: str) -> Tensor:
            return torch.stack([self.statistic(name, kind, state) for name in names]).to(dtype)

        if p.objective == "fisher_diag":
            merged, result = solve_fisher_diag(thetas, stacked(FISHER), x0, **cg)
        else:
            grams_in = shrink_off_diagonal(stacked(GRAM_IN), p.model_lambda)
            grams_out = shrink_off_diagonal(stacked(GRAM_OUT), p.model_lambda) if p.objective == "kfac" else None
            merged, result = solve_linear(thetas, grams_in, grams_out, x0, **cg)
        seconds = (time.perf_counter() - started) / len(names)
        solves = state.setdefault(SOLVES, {})  # tensor -> iterations, residual, converged, seconds
        for g, name in enumerate(names):
            solves[name] = {"iterations": int(result.iterations[g]), "residual": float(result.residual[g]),
                                 "converged": bool(result.converged[g]), "seconds": seconds}
            log.debug("mats %s %s: %s", p.objective, name, solves[name])
        return (merged.transpose(-2, -1) if any(in_out) else merged).to(torch.float32)
