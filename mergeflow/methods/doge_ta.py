"""DOGE TA (Wei et al., "Modeling Multi-Task Model Merging as Adaptive Projective Gradient Descent", ICML 2025):
data-free, as the reference code (FusionBench `doge_ta`, the authors' own) computes it. Per selected linear layer:

1. lambda_i = eta / ||tau_i||_F (per task, per layer);
2. shared subspace Q [d_out, floor(r/s)]: left singular vectors of the concatenated per-task top-floor(r/N) left
   bases (r = min(d_out, d_in)); only Q is kept, never the d_out x d_out projector;
3. one shared delta (zeros) minimises L(delta) = sum_j sum_rows <T_j[r], T_j[r] - M[r]>^2 with
   M = sum_i lambda_i T_i + Lambda delta, Lambda = sum_i lambda_i: each step takes the closed-form gradient,
   removes its component in span(Q), then takes an Adam step (project, then Adam);
4. merged = theta_0 + sum_i lambda_i m_i * (T_i + delta), m_i the top-`keep` magnitude mask of the ORIGINAL
   tau_i, global over the selected layers (`prepare`).

Selection: 2-D linear weights by kind (fused attention `in_proj_weight` included), not the reference's name
filter ("encoder" and "weight" and not "layer_norm"), which misses RoBERTa's "LayerNorm", Llama and T5 decoders;
`include` / `exclude` patterns override it. The other tensors follow `unselected` (the reference: pretrained).
Layers of equal shape are optimised together (the engine's `merge_group`), on the pool's device, in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from mergeflow import stopping
from mergeflow.errors import ConfigError
from mergeflow.methods.base import MergeMethod, MethodParams, resume_for, stored_factors
from mergeflow.selection import ParameterSelection
from mergeflow.sparsify import global_topk_thresholds
from mergeflow.subspace import shared_basis as shared_subspace
from mergeflow.task_vectors import ExpertPool
from mergeflow.warm_start import Resume, keep_adam, resume_adam


class DogeTAParams(MethodParams):
    eta: float = Field(0.07, gt=0.0, le=10.0, description="global magnitude: lambda_i = eta / ||tau_i||_F per layer "
                       "(0.07: the reference's vision value; the paper uses 0.15 for NLP)")
    subspace_divisor: int = Field(6, ge=1, le=4096, description="shared basis size floor(r / divisor), "
                                  "r = min(d_out, d_in)")
    keep: float = Field(0.3, gt=0.0, le=1.0, description="fraction of each task vector kept (largest |values| of "
                        "the original task vector over all selected layers)")
    steps: int = Field(400, ge=0, le=100_000, description="Adam steps per layer")
    lr: float = Field(1e-4, gt=0.0, le=1.0, description="Adam learning rate (default betas and eps)")
    unselected: Literal["pretrained", "average", "task_arithmetic"] = Field(
        "pretrained", description="tensors outside the selection: keep theta_0 (the reference), theta_0 + mean "
        "tau, or theta_0 + unselected_scaling * sum tau")
    unselected_scaling: float = Field(0.3, ge=0.0, le=10.0,
                                      description="lambda of unselected='task_arithmetic' (0.3: the 8-task default)")
    include: tuple[str, ...] = Field((), description="regexes of tensors to optimise besides the 2-D linear weights "
                                     "selected by kind (fused in_proj included); must be 2-D")
    exclude: tuple[str, ...] = Field((), description="regexes of tensors to leave to the unselected policy")
    group_mb: float | None = Field(None, ge=0.0, le=1e6, description="cap (MB) on the stacked task vectors of one "
                                   "group of equal-shape layers optimised together; 0: one layer at a time; "
                                   "default: 256 on a GPU, 0 on the CPU (measured faster there)")

    @model_validator(mode="after")
    def _patterns_compile(self) -> DogeTAParams:
        ParameterSelection(include=self.include, exclude=self.exclude)
        return self


def task_coefficients(task_vectors: torch.Tensor, eta: float) -> torch.Tensor:
    """lambda [..., N] = eta / ||T_i||_F of task vectors [..., N, d_out, d_in]; 0 for an all-zero task vector."""
    norms = torch.linalg.vector_norm(task_vectors, dim=(-2, -1))
    return torch.where(norms > 0, eta / norms, torch.zeros_like(norms))


class DogeObjective:
    """L(delta) of G equal-shape layers (task vectors [G, N, d_out, d_in], lambda [G, N]) and its closed-form
    gradient: with a_j[r] = <T_j[r], T_j[r] - M[r]>, dL/d delta[r] = -2 Lambda sum_j a_j[r] T_j[r].

    a_j = offset_j - Lambda <T_j[r], delta[r]>, where offset_j = <T_j[r], T_j[r] - sum_i lambda_i T_i[r]> is
    fixed; a step touches only [N, G, d_out] and [G, d_out, d_in] intermediates, never [G, N, d_out, d_in]."""

    def __init__(self, task_vectors: torch.Tensor, lam: torch.Tensor):
        self.task_vectors = task_vectors
        n = task_vectors.shape[1]
        self.total = lam.sum(dim=1, keepdim=True)  # Lambda [G, 1]
        anchor = torch.einsum("gn,gnrc->grc", lam, task_vectors)
        self.offsets = torch.stack([torch.linalg.vecdot(task_vectors[:, j], task_vectors[:, j] - anchor)
                                    for j in range(n)])
        self.weights = torch.empty_like(self.offsets)

    def gradient(self, delta: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """dL/d delta [G, d_out, d_in], written into `out` (also used as scratch)."""
        tvs, w = self.task_vectors, self.weights
        for j in range(tvs.shape[1]):
            torch.sum(torch.mul(tvs[:, j], delta, out=out), dim=-1, out=w[j])
        w.mul_(self.total).sub_(self.offsets).mul_(2 * self.total)  # -2 Lambda a_j
        torch.mul(tvs[:, 0], w[0].unsqueeze(-1), out=out)
        for j in range(1, tvs.shape[1]):
            out.addcmul_(tvs[:, j], w[j].unsqueeze(-1))
        return out


def optimise_delta(task_vectors: torch.Tensor, lam: torch.Tensor, basis: torch.Tensor, steps: int,
                   lr: float, resume: Resume | None = None) -> torch.Tensor:
    """The shared modification delta [G, d_out, d_in] after `steps` projected Adam steps from zero: each step's
    gradient g becomes g - Q (Q^T g) (Q = `basis` [G, d_out, k]) before torch's Adam uses it. `resume`: continue
    from a kept state of fewer steps, and keep this run's end state."""
    objective = DogeObjective(task_vectors, lam)
    delta = torch.zeros_like(task_vectors[:, 0])
    delta.grad = torch.empty_like(delta)
    coefficients = delta.new_empty(basis.shape[0], basis.shape[2], delta.shape[2])
    adam = torch.optim.Adam([delta], lr=lr, fused=delta.device.type in ("cpu", "cuda"))
    done = resume_adam(resume, delta, adam, steps)
    for _ in range(steps - done):
        stopping.check()
        grad = objective.gradient(delta, out=delta.grad)
        if basis.shape[2]:
            grad.baddbmm_(basis, torch.bmm(basis.mT, grad, out=coefficients), alpha=-1)
        adam.step()
    keep_adam(resume, delta, adam, steps, done)
    return delta


class DogeTA(MergeMethod):
    name = "doge_ta"
    summary = "DOGE TA: task-aware lambda, projected data-free delta, top-k trim (data-free)."
    Params = DogeTAParams
    # auto: fewer points (each is a full merge)
    sweep_grid = {"eta": [0.03, 0.07, 0.15, 0.3, 0.6]}
    search_grid = {"eta": [0.07, 0.15, 0.3]}
    fidelity = ("steps",)  # Adam steps per layer: `auto`'s early rungs run fewer
    prepare_params = ("keep", "include", "exclude")

    def subspace_kinds(self) -> tuple[str, ...]:
        return (f"shared-{self.params.subspace_divisor}",)

    def prepare(self, pool: ExpertPool, *, progress: bool = False) -> dict[str, Any]:
        p = self.params
        infos = pool.infos()
        selected = ParameterSelection(include=p.include, exclude=p.exclude).select(infos)
        chosen = set(selected)
        if bad := [info.name for info in infos if info.name in chosen and len(info.shape) != 2]:
            raise ConfigError(f"method 'doge_ta' optimises 2-D weights only; selected: {', '.join(bad[:5])}")
        thresholds = global_topk_thresholds(pool, p.keep, keys=selected, progress=progress)
        return {"selected": selected, "thresholds": thresholds}

    def grouping(self, state: dict[str, Any], device: torch.device) -> tuple[Sequence[str], int]:
        group_mb = self.params.group_mb
        if group_mb is None:  # on a CPU a group's buffers fall out of the L3 cache: one layer at a time is faster
            group_mb = 0.0 if device.type == "cpu" else 256.0
        return state["selected"], int(group_mb * 1e6)

    def merge_group(self, names: Sequence[str], bases: torch.Tensor, task_vectors: torch.Tensor,
                    state: dict[str, Any]) -> torch.Tensor:
        p = self.params
        lam = task_coefficients(task_vectors, p.eta)
        kind = f"shared-{p.subspace_divisor}"
        stored = [stored_factors(state, kind, name) for name in names]
        basis = torch.stack([shared_subspace(tvs, p.subspace_divisor) if factors is None else
                             factors["q"].to(tvs.device) for tvs, factors in zip(task_vectors, stored)])
        delta = optimise_delta(task_vectors, lam, basis, p.steps, p.lr, resume_for(state, names))
        merged = bases.clone()
        for i, threshold in enumerate(state["thresholds"]):
            tv = task_vectors[:, i]
            kept = torch.add(tv, delta).mul_(tv.abs() >= threshold)  # the mask of the original task vector
            merged.addcmul_(kept, lam[:, i].view(-1, 1, 1))
        return merged

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: torch.Tensor,
                     state: dict[str, Any]) -> torch.Tensor:
        if name in state["selected"]:
            return self.merge_group([name], base[None], task_vectors[None], state)[0]
        if self.params.unselected == "average":
            return base + task_vectors.mean(dim=0)
        if self.params.unselected == "task_arithmetic":
            return base + self.params.unselected_scaling * task_vectors.sum(dim=0)
        return base
