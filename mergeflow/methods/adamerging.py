"""AdaMerging (Yang et al., ICLR 2024): theta = theta_0 + sum_i lambda_i tau_i with the lambda learned by
minimising the summed Shannon entropy of the merged model's predictions on unlabeled inputs (`ExpertPool.objective`,
e.g. `mergeflow.families.text.encoder.entropy_objective`). Fed test inputs, as in the paper, it is transductive: say so
when reporting its results.

Variants: official = `clamp` True (lambda in [0, 1]), 500 steps; FusionBench = no clamp, 1000 steps. Both use
Adam lr 1e-3 from 0.3. One batch per task per step (the official loop takes two, a quirk not reproduced).
`prepare` holds the fp32 base and every task vector of all float tensors at once on the pool's device (memory:
N + 1 models, plus the objective's model and activations), learns the coefficients and returns them as the state.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from mergeflow.coefficients import learn_coefficients
from mergeflow.errors import ConfigError
from mergeflow.methods.base import MergeMethod, MethodParams
from mergeflow.task_vectors import ExpertPool
from mergeflow.warm_start import Resume


class AdaMergingParams(MethodParams):
    granularity: Literal["layer", "task"] = Field(
        "layer", description="'layer': one lambda per task and parameter tensor; 'task': one lambda per task")
    clamp: bool = Field(False, description="clamp lambda to [0, 1] (official code) or not (FusionBench)")
    steps: int = Field(500, ge=1, le=100_000, description="Adam steps (official 500, FusionBench 1000)")
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="Adam learning rate")
    init: float = Field(0.3, ge=0.0, le=1.0, description="initial lambda")
    seed: int = Field(0, ge=0, description="seeds torch's RNG while the objective runs")


class AdaMerging(MergeMethod):
    name = "adamerging"
    summary = "Coefficients learned by entropy minimisation on unlabeled inputs (needs an objective; transductive)."
    Params = AdaMergingParams
    # auto: searched only when named in search.methods (each point is a training run on an entropy objective)
    search_grid = {"steps": [100, 500]}
    fidelity = ("steps",)  # Adam steps on the objective: `auto`'s early rungs run fewer
    needs_objective = True

    def prepare(self, pool: ExpertPool, *, progress: bool = False) -> dict[str, Any]:
        if pool.objective is None:
            raise ConfigError(f"method {self.name!r} learns its coefficients on unlabeled data and needs an "
                              "objective: run it in a flow (its tasks' unlabeled inputs make one) or pass `objective=` "
                              "(e.g. mergeflow.families.text.encoder.entropy_objective); none was given")
        base = {name: pool.base_tensor(name) for name in pool.float_keys()}
        task_vectors = {name: pool.task_vectors(name, tensor) for name, tensor in base.items()}
        p = self.params
        learned = learn_coefficients(base, task_vectors, pool.objective, granularity=p.granularity, init=p.init,
                                     lr=p.lr, steps=p.steps, clamp=p.clamp, seed=p.seed, progress=progress,
                                     resume=Resume.of(pool.warm, ["coefficients"]))  # `auto`'s early rungs
        return {"coefficients": learned.coefficients, "losses": learned.losses}

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: torch.Tensor,
                     state: dict[str, Any]) -> torch.Tensor:
        coefficients = torch.tensor(state["coefficients"][name], dtype=torch.float32, device=base.device)
        return base + torch.tensordot(coefficients, task_vectors, dims=1)
