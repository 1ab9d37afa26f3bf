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
The row-local variants (no sparsification, DARE's) are two-pass methods: a tensor larger than the engine's window
comes in blocks of rows, first for the L1 norms (float64 totals of fp32 sums per tile of rows), then to merge; the
election and the mix run tile by tile into the output dtype, so memory holds tiles, not copies of the tensor.
Each variant is a subclass that fixes `sparsification`, `consensus` and its defaults (its own small file).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator

from mergeflow.errors import ConfigError
from mergeflow.methods.base import (BLOCK_OFFSET, OUT_DTYPE, TENSOR_SUMS, MergeMethod, MethodParams, sum_parts,
                                    tile_rows)
from mergeflow.methods.settings import Setting, check_range, depth, layer_counts, resolve
from mergeflow.parallel import parallel_map
from mergeflow import sparsify
from mergeflow.sparsify import seeded_draws, seeded_generator
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
    two_pass = True  # row-local sparsifications (none, DARE's): large tensors may come in blocks of rows

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.two_pass = cls.sparsification in (None, "random")

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

    def needs_sums(self, name: str, state: dict[str, Any]) -> bool:
        """Only DARE's L1 rescale needs sums over the whole tensor (each expert's before and after the drop)."""
        return self.sparsification == "random" and self.params.rescale

    def block_sums(self, name: str, base: torch.Tensor, task_vectors: torch.Tensor,
                   state: dict[str, Any]) -> torch.Tensor:
        return self._drop(name, task_vectors, state, sums=True)

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: torch.Tensor,
                     state: dict[str, Any]) -> torch.Tensor:
        """Sparsified in place, in the engine's buffer of task vectors (read no more after this call), one expert
        per core; then weighted, elected and mixed tile by tile into a tensor of the output dtype. The sums over
        experts are mergekit's, so the arithmetic is its own."""
        t = depth(name, state.get("layers", {}))
        n = len(task_vectors)
        rescale = [1.0] * n
        if self.sparsification == "random":
            sums = state.get(TENSOR_SUMS)
            partial = self._drop(name, task_vectors, state, sums=sums is None and self.params.rescale)
            if self.params.rescale:
                totals = (sum_parts([partial]) if sums is None else sums).tolist()
                rescale = [_l1_ratio(totals[2 * i], totals[2 * i + 1]) for i in range(n)]
        elif self.sparsification is not None:
            parallel_map(lambda i: self.sparsify_(task_vectors[i], i, name, t), range(n))
        weights = [self.value("weight", i, name, t) for i in range(n)]
        return self._mix(base, task_vectors, rescale, weights, state.get(OUT_DTYPE, torch.float32))

    def _drop(self, name: str, deltas: torch.Tensor, state: dict[str, Any], sums: bool) -> torch.Tensor | None:
        """DARE's drop of each expert's block of rows, in place, tile by tile (the masks of `dare_keep_mask` at the
        block's offset, so a block is dropped as in the whole tensor); with `sums`: float64 [tiles, 2N], each
        expert's L1 norm of each tile before and after the drop."""
        t, offset, n = depth(name, state.get("layers", {})), state.get(BLOCK_OFFSET, 0), len(deltas)
        shape = tuple(deltas.shape[1:])
        rows, step = (shape[0] if len(shape) >= 2 else 1), tile_rows(shape)
        flat = deltas.view(n, rows, -1)  # a view: the drop happens in the engine's buffer
        out = torch.zeros((-(-rows // step), 2 * n), dtype=torch.float64, device=deltas.device) if sums else None

        def one(i: int) -> None:
            density = self.value("density", i, name, t)
            if density >= 1 or deltas[i].numel() == 0:
                return
            if density <= 0:
                deltas[i].zero_()
                return
            for tile, row in enumerate(range(0, rows, step)):
                tau = flat[i, row:row + step]
                keep = keep_floats(tau.numel(), 1.0 - density, self.params.seed, i, name, offset + row * tau.shape[1])
                keep = keep.view(tau.shape).to(tau.device)
                if out is not None:
                    size = tau.abs()
                    out[tile, 2 * i] = size.sum()
                    out[tile, 2 * i + 1] = size.mul_(keep).sum()
                tau.mul_(keep)  # x * 0 (not a fill): a NaN or Inf dropped still reaches the output's check

        parallel_map(one, range(n))
        return out

    def _mix(self, base: torch.Tensor, deltas: torch.Tensor, rescale: list[float], weights: list[float],
             dtype: torch.dtype) -> torch.Tensor:
        """theta_0 + scaling * mixed (module docstring), tile by tile of rows, the deltas rescaled and weighted in
        place; a new tensor of `dtype` (never the engine's buffer)."""
        n, rows, step = len(deltas), (base.shape[0] if base.dim() >= 2 else 1), tile_rows(tuple(base.shape))
        flat, bases = deltas.view(n, rows, -1), base.reshape(rows, -1)
        out = torch.empty(base.shape, dtype=dtype, device=base.device)
        flat_out = out.view(rows, -1)
        factors = torch.tensor(rescale, dtype=torch.float32, device=base.device).reshape(n, 1, 1)
        weight = torch.tensor(weights, dtype=torch.float32, device=base.device).reshape(n, 1, 1)
        total_weight = weight.sum(dim=0)
        total_weight[total_weight.abs() < 1e-8] = 1
        rescaled, weighted = any(r != 1 for r in rescale), any(w != 1 for w in weights)
        for row in range(0, rows, step):
            d = flat[:, row:row + step]
            if rescaled:
                d.mul_(factors)
            if weighted:
                d.mul_(weight)
            if self.consensus and self.params.normalize:
                keep = torch.where(d.sum(dim=0) >= 0, d > 0, d < 0)  # sign(delta) == the elected sign (>= 0: +)
                divisor = (weight * keep).sum(dim=0)
                mixed = d.masked_fill_(~keep, 0.0).sum(dim=0)
                divisor[divisor == 0] = 1
                mixed.div_(divisor)
            elif self.consensus:  # the same sums: the entries of the elected sign, zeros for the others
                plus = d.sum(dim=0).sign_().add_(1).clamp_(max=1)  # 1 where the elected sign is + (sum >= 0), else 0
                mixed = d.clamp(min=0).sum(dim=0).mul_(plus)  # exact selections: x * 1 + y * 0 = x (finite x, y)
                mixed.add_(d.clamp(max=0).sum(dim=0).mul_(plus.sub_(1).neg_()))
            else:
                mixed = d.sum(dim=0)
                if self.params.normalize:
                    mixed.div_(total_weight)
            flat_out[row:row + step] = mixed.mul_(self.params.scaling).add_(bases[row:row + step])
        return out

    def sparsify_(self, tau: torch.Tensor, expert: int, name: str, t: float) -> None:
        """Sparsify one expert's whole task vector of one tensor in place by a rule that is not row-local
        ("magnitude", "outliers", "rank"; DARE's is `_drop`), and L1-rescale it."""
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


def keep_floats(count: int, drop_rate: float, seed: int, expert: int, name: str, offset: int) -> torch.Tensor:
    """`mergeflow.sparsify.dare_keep_mask` of the flat coordinates [offset, offset + count) as fp32 1s and 0s, built
    from the same draws without bool tensors (a float mask multiplies at full speed; torch's bool kernels do not)."""
    size = sparsify._DARE_BLOCK
    threshold = round(drop_rate * 65536) - 32768  # keep a draw v (shifted by -32768) when v >= threshold
    parts, position, stop = [], offset, offset + count
    while position < stop:
        block = position // size
        first, end = block * size, min(stop, (block + 1) * size)
        draws = torch.empty(-(-(end - first) // 3), dtype=torch.int64)
        quarters = (draws.random_(generator=seeded_generator(seed, expert, name, block)).view(torch.int16)
                    ^ -32768).view(-1, 4)  # three 16-bit draws in the low 48 bits of each (sparsify._uniform16)
        spread = torch.empty((len(quarters), 3), dtype=torch.float32)
        for k in range(3):
            spread[:, k] = quarters[:, k]
        parts.append(spread.view(-1)[position - first:end - first])
        position = end
    keep = parts[0] if len(parts) == 1 else torch.cat(parts)
    return keep.sub_(threshold - 1).clamp_(0, 1)  # integer draws: v - threshold + 1 >= 1 exactly when kept


def _l1_ratio(before: float, after: float) -> float:
    """The rescale that gives the kept entries the tensor's L1 norm (1 where either norm is ~0 or not finite)."""
    return before / after if before >= 1e-7 and after >= 1e-7 and math.isfinite(before / after) else 1.0


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
