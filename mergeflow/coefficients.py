"""AdaMerging's learner (Yang et al., ICLR 2024): merging coefficients learned by minimising an objective.

theta_k = theta_0,k + sum_i lambda_{i,k} tau_i,k for every given tensor k, with one lambda per task shared by all
tensors ("task") or one per task and tensor ("layer": every tensor, biases and norms included; theta_0 keeps
coefficient 1). The objective (for AdaMerging the summed prediction entropy on unlabeled inputs,
`mergeflow.families.text.encoder.entropy_objective`) receives the merged tensors, differentiable w.r.t. lambda only,
and the step number. Lambda starts at `init` and is fit by Adam.

`clamp` follows the official code: the objective sees clamp(lambda, 0, 1) while the raw parameter is left
unprojected, so a coefficient pushed out of [0, 1] sits at the bound with no gradient; FusionBench does not clamp.
Tensors not given are not merged here: the objective's model keeps its own (DOGE AM learns on linear weights only).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from mergeflow.progress import progress_bar
from mergeflow.task_vectors import Objective
from mergeflow.warm_start import Resume, keep_adam, resume_adam

Granularity = Literal["task", "layer"]


@dataclass(frozen=True)
class LearnedCoefficients:
    coefficients: dict[str, list[float]]  # tensor name -> its lambda for each task (the merge uses these)
    losses: list[float]  # objective at each step, before that step's update


def merge_with(base: Mapping[str, Tensor], task_vectors: Mapping[str, Tensor],
               coefficients: Tensor) -> dict[str, Tensor]:
    """theta_0 + sum_i lambda_i tau_i per tensor; `coefficients` [K, N] in the order of `base`'s keys."""
    return {name: base[name] + torch.tensordot(coefficients[k], task_vectors[name], dims=1)
            for k, name in enumerate(base)}


def learn_coefficients(
    base: Mapping[str, Tensor],
    task_vectors: Mapping[str, Tensor],
    objective: Objective,
    *,
    granularity: Granularity = "layer",
    init: float = 0.3,
    lr: float = 1e-3,
    steps: int = 500,
    clamp: bool = False,
    seed: int = 0,
    progress: bool = False,
    resume: Resume | None = None,
) -> LearnedCoefficients:
    """Fit lambda for fp32 `base` tensors [*shape] and their stacked `task_vectors` [N, *shape] (same keys, one
    device). `seed` seeds torch's RNG for the objective's own randomness; the learner itself draws nothing.
    `resume` (`mergeflow.warm_start`): continue from the kept end of a run with fewer steps (lambda, Adam's state,
    the losses, the RNG), the bits of running every step at once where the objective depends on the step number
    only, as `entropy_objective` does; and keep this run's end."""
    names = list(base)
    if not names or set(task_vectors) != set(names):
        raise ValueError("base and task_vectors need the same, non-empty set of tensor names")
    n = len(task_vectors[names[0]])
    for name in names:
        if task_vectors[name].shape != (n, *base[name].shape):
            raise ValueError(f"task vectors of {name!r} have shape {tuple(task_vectors[name].shape)}, "
                             f"expected {(n, *base[name].shape)}")
    device = base[names[0]].device
    raw = torch.full((n,) if granularity == "task" else (len(names), n), init, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([raw], lr=lr, betas=(0.9, 0.999))

    def coefficients() -> Tensor:
        effective = raw.clamp(0.0, 1.0) if clamp else raw
        return effective.expand(len(names), n)

    kept: dict[str, Tensor] = {}
    done = resume_adam(resume, raw, optimizer, steps, kept)
    losses = kept["losses"].tolist() if done else []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        if done:
            _set_rng(kept, device)
        for step in progress_bar(range(done, steps), desc="adamerging", disable=not progress):
            loss = objective(merge_with(base, task_vectors, coefficients()), step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        end = {"losses": torch.tensor(losses, dtype=torch.float64), **_rng(device)}
    keep_adam(resume, raw, optimizer, steps, done, end)
    with torch.no_grad():
        final = coefficients().cpu()
    return LearnedCoefficients({name: final[k].tolist() for k, name in enumerate(names)}, losses)


def _rng(device: torch.device) -> dict[str, Tensor]:
    """Torch's RNG state (CPU, and the CUDA device's where the fit runs there)."""
    return {"rng": torch.get_rng_state(), **({"cuda_rng": torch.cuda.get_rng_state(device)}
                                            if device.type == "cuda" else {})}


def _set_rng(kept: dict[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(kept["rng"].cpu())
    if device.type == "cuda":  # CUDA only
        torch.cuda.set_rng_state(kept["cuda_rng"].cpu(), device)
