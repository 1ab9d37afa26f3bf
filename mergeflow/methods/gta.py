"""Generalised task arithmetic, mergekit's way: per-tensor sparsification x sign consensus x normalisation.

For every tensor, with per-expert weight w_i and density d_i (numbers, layer gradients or name filters:
`mergeflow.methods.settings`):
  delta_i = sparsify(tau_i, d_i)                 per tensor, per expert (the variant's sparsification)
  delta_i *= w_i
  consensus:  keep the entries whose sign equals sign(sum_i delta_i) (>= 0 counts as +), else every entry
  mixed = sum_i keep_i delta_i, divided by sum_i w_i keep_i where `normalize` (0 -> 1)
  merged = theta_0 + scaling * mixed               (`scaling` is mergekit's lambda)
Sparsifications: "magnitude" keeps the top d |values| of the tensor; "random" keeps each entry with probability d
(DARE); "outliers" drops the top gamma |values| and keeps the next d (Model Breadcrumbs); "rank" keeps each entry
with a probability from d - epsilon to d + epsilon by its magnitude rank in its row (DELLA's MagPrune). With
`rescale`, the kept entries are scaled so the tensor keeps its L1 norm (mergekit's rescale, not DARE's 1/d).
Random masks come from DARE's draws (`mergeflow.sparsify.seeded_draws`: 16-bit, from generators seeded per (seed,
expert, tensor, block); probabilities taken to the nearest 1/65536): the same on every device and in any order,
but not mergekit's draws (it uses torch's global generator).
Each variant is a subclass that fixes `sparsification`, `consensus` and its defaults (its own small file).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator

from mergeflow.errors import ConfigError
from mergeflow.methods.base import MergeMethod, MethodParams
from mergeflow.methods.settings import Setting, check_range, depth, layer_counts, resolve
from mergeflow.parallel import parallel_map
from mergeflow.sparsify import dare_keep_mask, seeded_draws
from mergeflow.task_vectors import ExpertPool

Sparsification = Literal["magnitude", "random", "outliers", "rank"] | None

class ExpertSettings(MethodParams):
    """One expert's own values (in the experts' order); a value left out takes the method-wide one."""

    weight: Setting | None = None
    density: Setting | None = None
    gamma: Setting | None = None
    epsilon: Setting | None = None

    @field_validator("density")
    @classmethod
    def _density(cls, value: Setting | None) -> Setting | None:
        return check_range(value, "density", lambda v: 0.0 <= v <= 1.0, "[0, 1]")

    @field_validator("gamma", "epsilon")
    @classmethod
    def _fraction(cls, value: Setting | None) -> Setting | None:
        return check_range(value, "gamma/epsilon", lambda v: 0.0 <= v < 1.0, "[0, 1)")


class WeightParams(MethodParams):
    """Weights per expert: method-wide, overridden per expert."""

    weight: Setting = Field(1.0, description="each expert's weight w_i (a number, a layer gradient [a, b, ..] or "
                                             "name filters [{filter: s, value: v}]); per_expert overrides it")
    per_expert: tuple[ExpertSettings, ...] = Field(
        (), description="one entry per expert, in the experts' order: {weight, density, gamma, epsilon}")

    @field_validator("weight")
    @classmethod
    def _weight(cls, value: Setting) -> Setting:
        return check_range(value, "weight", lambda v: -1e6 < v < 1e6, "(-1e6, 1e6)")

    @model_validator(mode="after")
    def _own_values(self) -> "WeightParams":
        for i, own in enumerate(self.per_expert):
            for key in own.model_fields_set:
                if getattr(own, key) is not None and key not in type(self).model_fields:
                    raise ValueError(f"per_expert[{i}].{key}: this method takes no {key}")
        return self


class GtaParams(WeightParams):
    scaling: float = Field(1.0, ge=0.0, le=10.0, description="lambda applied to the mixed update (mergekit's lambda)")
    normalize: bool = Field(False, description="divide by the sum of the weights (of the entries kept)")


class SparseParams(GtaParams):
    """A variant that sparsifies each tensor of each task vector."""

    density: Setting = Field(1.0, description="fraction of each tensor's task-vector entries kept (per tensor)")
    rescale: bool = Field(False, description="rescale kept entries to the tensor's L1 norm")

    @field_validator("density")
    @classmethod
    def _density(cls, value: Setting) -> Setting:
        return check_range(value, "density", lambda v: 0.0 <= v <= 1.0, "[0, 1]")


class RandomParams(SparseParams):
    """A variant whose sparsification draws random masks."""

    seed: int = Field(0, description="seed of the random masks")


class GeneralizedTaskArithmetic(MergeMethod):
    """The core: a variant sets `sparsification`, `consensus` and its Params' defaults."""

    Params: ClassVar[type[WeightParams]] = GtaParams
    sparsification: ClassVar[Sparsification] = None
    consensus: ClassVar[bool] = False
    scaling_param = "scaling"
    checks_inline = True
    prepare_is_cheap = True
    searched_by_default = False  # mergekit's: `auto` searches it when named in search.methods

    def prepare(self, pool: ExpertPool, *, progress: bool = False) -> dict[str, Any]:
        """The layer count of each stack (for gradients), after checking `per_expert` against the experts."""
        n, given = len(pool.experts), len(self.params.per_expert)
        if given and given != n:
            raise ConfigError(f"method {self.name!r}: per_expert has {given} entries for {n} experts")
        return {"layers": layer_counts(pool.float_keys())}

    def value(self, key: str, expert: int, name: str, t: float) -> float:
        """Parameter `key` of one expert for tensor `name` at depth `t`: its own setting, else the method's."""
        own = self.params.per_expert[expert] if self.params.per_expert else None
        for setting in (getattr(own, key, None), getattr(self.params, key, None)):
            found = resolve(setting, name, t)
            if found is not None:
                return found
        default = type(self.params).model_fields[key].default
        if isinstance(default, (int, float)):
            return float(default)
        raise ConfigError(f"method {self.name!r}: no {key} matches tensor {name!r} for expert {expert}")

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: torch.Tensor,
                     state: dict[str, Any]) -> torch.Tensor:
        """Sparsified and weighted in place, in the engine's buffer of task vectors (read no more after this call),
        one expert per core; the sums over experts are mergekit's, so the arithmetic is its own."""
        t = depth(name, state.get("layers", {}))
        n = len(task_vectors)
        weights = torch.tensor([self.value("weight", i, name, t) for i in range(n)], dtype=torch.float32,
                               device=base.device).reshape((n,) + (1,) * base.dim())
        deltas = task_vectors

        def prepare_row(i: int) -> None:
            if self.sparsification is not None:
                self.sparsify_(deltas[i], i, name, t)
            deltas[i].mul_(weights[i])

        parallel_map(prepare_row, range(n))
        if self.consensus:
            positive = deltas.sum(dim=0) >= 0  # the elected sign; an entry is kept where its own sign is it
            keep = torch.where(positive, deltas > 0, deltas < 0)  # = sign(delta) == elected, in bytes not floats
            del positive
            divisor = (weights * keep).sum(dim=0) if self.params.normalize else None
            mixed = deltas.masked_fill_(~keep, 0.0).sum(dim=0)
            del keep
            if divisor is not None:
                divisor[divisor == 0] = 1
        else:
            mixed = deltas.sum(dim=0)
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        if self.params.normalize:
            mixed.div_(divisor)
        return mixed.mul_(self.params.scaling).add_(base)

    def sparsify_(self, tau: torch.Tensor, expert: int, name: str, t: float) -> None:
        """Sparsify one expert's task vector of one tensor in place by the variant's rule (and L1-rescale it)."""
        density = self.value("density", expert, name, t)
        if density >= 1 or tau.numel() == 0:
            return
        if density <= 0:
            tau.zero_()
            return
        kind = self.sparsification
        if kind == "magnitude":
            keep = _rank_window(tau, tau.numel() - max(1, int(density * tau.numel())), tau.numel())
        elif kind == "outliers":
            kept = int(density * tau.numel())
            top = int(self.value("gamma", expert, name, t) * tau.numel())
            low = max(0, tau.numel() - kept - top)
            keep = _rank_window(tau, low, low + kept)
        elif kind == "random":
            keep = dare_keep_mask(tau.shape, 1.0 - density, self.params.seed, expert, name).to(tau.device)
        else:  # "rank": DELLA's MagPrune
            probability = _rank_probabilities(tau, density, self.value("epsilon", expert, name, t), self.name)
            threshold = torch.round((1.0 - probability) * 65536).sub_(32768).to(torch.int32)  # DARE's draws
            keep = seeded_draws(tau.numel(), self.params.seed, expert, name).reshape(tau.shape).to(tau.device) \
                >= threshold
        before = tau.abs().sum() if self.params.rescale else None
        tau.masked_fill_(~keep, 0.0)
        if before is None:
            return
        after = tau.abs().sum()
        if before >= 1e-7 and after >= 1e-7:
            tau.mul_(before / after)


def _rank_window(tau: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """Mask of the entries whose rank by |value| (ascending; equal magnitudes in index order) is in [low, high)."""
    mask = torch.zeros(tau.numel(), dtype=torch.bool, device=tau.device)
    if high > low:
        order = torch.sort(tau.abs().reshape(-1), stable=True).indices
        mask[order[low:high]] = True
    return mask.reshape(tau.shape)


def _rank_probabilities(tau: torch.Tensor, density: float, epsilon: float, method: str) -> torch.Tensor:
    """DELLA's keep probabilities: d - eps for the smallest |value| of each row up to d + eps for the largest
    (rows: the second axis of a 2-D+ tensor, as mergekit ranks them; a 1-D tensor is one row)."""
    if not (0 < density - epsilon and density + epsilon < 1):
        raise ConfigError(f"method {method!r}: density +/- epsilon must lie in (0, 1); got density {density}, "
                          f"epsilon {epsilon}")
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(torch.float32) + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    spread = ((ranks - low) / (high - low)).clamp(0, 1).nan_to_num(0.0)
    return ((density - epsilon) + spread * 2 * epsilon).reshape(tau.shape)
