"""DOGE AM (Wei et al., ICML 2025, the AdaMerging variant; FusionBench's `LayerWiseMergedModel` in
`layer_wise_fusion_doge_ta.py`): DOGE's data-free modification with one delta per task, then layer-wise AdaMerging
on the adjusted task vectors. Per selected linear layer:

1. lambda_i = eta / ||tau_i||_F (they only weigh the loss: the learned coefficients replace them in the merge);
2. the shared subspace Q of size floor(r / N) (DOGE TA: r / 6), read from the subspace stage's `shared-tasks`
   factors when the merge has them;
3. per-task deltas minimise DOGE's loss with M = sum_i lambda_i (T_i + delta_i): dL/d delta_i = lambda_i g(M),
   each projected off span(Q), all updated by one Adam (400 steps, lr 1e-4);
4. adjusted vectors m_i * (T_i + delta_i), m_i the top-`keep` mask of the ORIGINAL tau_i, global over the layers;
5. w_{i,l} learned by entropy minimisation on unlabeled inputs (`ExpertPool.objective`; transductive when fed
   test inputs) on the adjusted vectors of the selected layers only, the other tensors at theta_0 throughout;
   merged = theta_0 + sum_i w_{i,l} m_i * (T_i + delta_i) on the selected layers, `unselected` elsewhere.

`prepare` keeps the adjusted vectors of the selected layers on the pool's device (N models' worth of linear
weights) for the coefficient fit and the merge; given a state without them (e.g. from a cache), a layer's
deltas are recomputed, deterministically.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from mergeflow.coefficients import learn_coefficients
from mergeflow import stopping
from mergeflow.errors import ConfigError
from mergeflow.methods.base import RUN_ONLY, MergeMethod, MethodParams, stored_factors
from mergeflow.methods.doge_ta import DogeObjective, shared_subspace, task_coefficients
from mergeflow.selection import ParameterSelection
from mergeflow.sparsify import global_topk_thresholds
from mergeflow.task_vectors import ExpertPool, shape_groups
from mergeflow.warm_start import Resume


ADJUSTED = RUN_ONLY + "adjusted"  # state key: each selected layer's adjusted task vectors m_i (T_i + delta_i)


class DogeAMParams(MethodParams):
    eta: float = Field(0.07, gt=0.0, le=10.0, description="lambda_i = eta / ||tau_i||_F per layer, in the loss only "
                       "(the reference hard-codes 0.07)")
    keep: float = Field(0.3, gt=0.0, le=1.0, description="fraction of each original task vector kept (global over "
                        "the selected layers)")
    steps: int = Field(400, ge=0, le=100_000, description="Adam steps of the deltas, per layer")
    lr: float = Field(1e-4, gt=0.0, le=1.0, description="Adam learning rate of the deltas")
    am_steps: int = Field(1000, ge=1, le=100_000, description="AdaMerging steps (FusionBench's DOGE AM: 1000)")
    am_lr: float = Field(1e-3, gt=0.0, le=1.0, description="AdaMerging Adam learning rate")
    am_init: float = Field(0.3, ge=0.0, le=1.0, description="initial AdaMerging coefficient")
    clamp: bool = Field(False, description="clamp the coefficients to [0, 1] (FusionBench's DOGE AM: no)")
    seed: int = Field(0, ge=0, description="seeds torch's RNG while the objective runs")
    unselected: Literal["pretrained", "average"] = Field(
        "pretrained", description="tensors outside the selection: theta_0 (the reference) or theta_0 + mean tau")
    include: tuple[str, ...] = Field((), description="regexes of 2-D tensors to adjust besides the linear weights")
    exclude: tuple[str, ...] = Field((), description="regexes of tensors to leave to the unselected policy")

    @model_validator(mode="after")
    def _patterns_compile(self) -> DogeAMParams:
        ParameterSelection(include=self.include, exclude=self.exclude)
        return self


def optimise_task_deltas(task_vectors: torch.Tensor, lam: torch.Tensor, basis: torch.Tensor, steps: int,
                         lr: float) -> torch.Tensor:
    """Per-task deltas [G, N, d_out, d_in] after `steps` projected Adam steps from zero, for G equal-shape layers
    (task vectors [G, N, d_out, d_in], lambda [G, N], basis Q [G, d_out, k]).

    With D = sum_i lambda_i delta_i, the loss depends on D only, so dL/d delta_i = (lambda_i / Lambda) g, g the
    shared-delta gradient (`DogeObjective`) at D / Lambda: one gradient and one projection per step, scaled per
    task (projection is linear), then one Adam over all deltas (Adam's state is per element, as in the reference).
    Adam ignores a constant gradient scale, so the deltas of different tasks agree up to Adam's eps.
    """
    objective = DogeObjective(task_vectors, lam)
    total = lam.sum(dim=1)
    share = torch.where(total > 0, 1 / total, torch.zeros_like(total))
    scale = (lam * share[:, None])[:, :, None, None]  # lambda_i / Lambda
    deltas = torch.zeros_like(task_vectors)
    deltas.grad = torch.empty_like(deltas)
    grad = torch.empty_like(task_vectors[:, 0])
    coefficients = grad.new_empty(basis.shape[0], basis.shape[2], grad.shape[2])
    adam = torch.optim.Adam([deltas], lr=lr, fused=deltas.device.type in ("cpu", "cuda"))
    for _ in range(steps):
        stopping.check()
        shared = torch.einsum("gn,gnrc->grc", lam, deltas).mul_(share[:, None, None])  # D / Lambda
        objective.gradient(shared, out=grad)
        if basis.shape[2]:
            grad.baddbmm_(basis, torch.bmm(basis.mT, grad, out=coefficients), alpha=-1)
        torch.mul(grad[:, None], scale, out=deltas.grad)
        adam.step()
    return deltas.detach()


class DogeAM(MergeMethod):
    name = "doge_am"
    summary = ("DOGE AM: per-task projected deltas on the trimmed task vectors, then layer-wise AdaMerging "
               "(needs an objective; transductive).")
    Params = DogeAMParams
    search_grid = {}
    # `auto`'s early rungs run fewer AdaMerging steps, continued by the survivors (`mergeflow.warm_start`); the
    # deltas' steps stay whole: fewer would make the vectors the fit learns on, so the fit, another problem
    fidelity = ("am_steps",)
    needs_objective = True

    adjusted: dict[str, torch.Tensor] | None = None

    def subspace_kinds(self) -> tuple[str, ...]:
        return ("shared-tasks",)

    def adjusted_vectors(self, task_vectors: torch.Tensor, thresholds: Sequence[float],
                         stored: Sequence[dict[str, torch.Tensor] | None] | None = None) -> torch.Tensor:
        """m_i * (T_i + delta_i) [G, N, d_out, d_in] of G equal-shape layers' task vectors (`stored`: each layer's
        factors from the subspace stage, or None to compute its shared basis here)."""
        p = self.params
        n = task_vectors.shape[1]
        lam = task_coefficients(task_vectors, p.eta)
        stored = stored or [None] * len(task_vectors)
        basis = torch.stack([shared_subspace(tvs, n) if factors is None else factors["q"].to(tvs.device)
                             for tvs, factors in zip(task_vectors, stored)])
        adjusted = optimise_task_deltas(task_vectors, lam, basis, p.steps, p.lr).add_(task_vectors)
        for i, threshold in enumerate(thresholds):
            adjusted[:, i].mul_(task_vectors[:, i].abs() >= threshold)
        return adjusted

    def prepare(self, pool: ExpertPool, *, progress: bool = False) -> dict[str, Any]:
        if pool.objective is None:
            raise ConfigError(f"method {self.name!r} learns its coefficients on unlabeled data and needs an "
                              "objective: run it in a flow (its tasks' unlabeled inputs make one) or pass `objective=` "
                              "(e.g. mergeflow.families.text.encoder.entropy_objective); none was given")
        p = self.params
        infos = pool.infos()
        selected = ParameterSelection(include=p.include, exclude=p.exclude).select(infos)
        chosen = set(selected)
        if bad := [info.name for info in infos if info.name in chosen and len(info.shape) != 2]:
            raise ConfigError(f"method {self.name!r} adjusts 2-D weights only; selected: {', '.join(bad[:5])}")
        if not selected:
            raise ConfigError(f"method {self.name!r}: no 2-D linear weight is selected (check include/exclude)")
        thresholds = global_topk_thresholds(pool, p.keep, keys=selected, progress=progress)
        bases, adjusted = {}, {}
        cap = 0 if pool.device.type == "cpu" else 256_000_000
        for group in shape_groups([info for info in infos if info.name in chosen], len(pool.experts), cap):
            stacked = torch.stack([pool.task_vectors(info.name) for info in group])
            reader = (pool.subspaces or {}).get("shared-tasks")
            stored = [None if reader is None else reader.factors(info.name) for info in group]
            for info, vectors in zip(group, self.adjusted_vectors(stacked, thresholds, stored)):
                adjusted[info.name] = vectors
                bases[info.name] = pool.base_tensor(info.name)
        bases = {name: bases[name] for name in selected}  # the learner keeps the checkpoint's order
        learned = learn_coefficients(bases, adjusted, pool.objective, granularity="layer", init=p.am_init,
                                     lr=p.am_lr, steps=p.am_steps, clamp=p.clamp, seed=p.seed, progress=progress,
                                     resume=Resume.of(pool.warm, ["coefficients"]))
        return {"selected": selected, "thresholds": thresholds, "coefficients": learned.coefficients,
                "losses": learned.losses, ADJUSTED: adjusted}

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: torch.Tensor,
                     state: dict[str, Any]) -> torch.Tensor:
        if name not in state["coefficients"]:
            return base + task_vectors.mean(dim=0) if self.params.unselected == "average" else base
        if name in state.get(ADJUSTED, {}):
            adjusted = state[ADJUSTED][name].to(base.device)
        else:  # a state from elsewhere: recompute this layer's deltas (deterministic)
            adjusted = self.adjusted_vectors(task_vectors[None], state["thresholds"],
                                             [stored_factors(state, "shared-tasks", name)])[0]
        coefficients = torch.tensor(state["coefficients"][name], dtype=torch.float32, device=base.device)
        return base + torch.tensordot(coefficients, adjusted, dims=1)
