"""The contract every merge method follows, and its parameter declarations.

A method declares its parameters once, as a frozen pydantic model (`Params`): types, defaults, ranges and
descriptions there drive `mergeflow methods`, CLI validation, run configs and the Prefect UI form.
Running a method is two calls on an `ExpertPool`:
  `prepare(pool)`  an optional global pass (e.g. TIES's model-wide top-k thresholds); returns a small
                   JSON-serialisable state, so the flow can run and cache it as its own stage (keys that start
                   with `RUN_ONLY` hold what lives only for this merge, e.g. tensors or the pool, and are never
                   recorded); a method keeps no run state on itself;
  `merge_tensor(name, base, task_vectors, state)`  the merged fp32 tensor for one parameter.
A whole merge calls `prepare_merge` instead of `prepare`: a method may leave a model-wide result to the merge pass
itself (TIES's majority sign) and settle the tensors that depend on it in `finish`.
The engine streams tensors through `merge_tensor`, so memory stays at one tensor's worth of N task vectors.

Optional batching, for methods whose per-tensor work is heavy (DOGE optimises every linear layer): `grouping`
names the tensors to batch and a byte cap; the engine hands those to `merge_group` in groups of equal shape
whose stacked task vectors [G, N, *shape] stay within the cap (a single tensor is always allowed), after the
other tensors have streamed through `merge_tensor`. Methods that do not override `grouping` are untouched.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mergeflow.errors import ConfigError
from mergeflow.task_vectors import ExpertPool
from mergeflow.warm_start import Resume


RUN_ONLY = "_"  # prefix of state keys that live only for one merge (never recorded)
BLOCK_OFFSET = RUN_ONLY + "offset"  # run-only: flat index of the first coordinate `merge_tensor` receives
TENSOR_SUMS = RUN_ONLY + "sums"  # run-only: a two-pass method's totals of `block_sums` over a tensor sent in blocks
OUT_DTYPE = RUN_ONLY + "out_dtype"  # run-only: the dtype the merged tensor is written in (merge_tensor may return it)


TILE = 1 << 18  # entries per tile of a two-pass method's work (in cache): whole rows, or one row wider than this


def tile_rows(shape: Sequence[int]) -> int:
    """Rows per tile of a tensor of this shape (a tensor of fewer than two dimensions is one row)."""
    return max(1, TILE // max(1, math.prod(shape[1:]))) if len(shape) >= 2 else 1


def tile_columns(shape: Sequence[int]) -> int:
    """Columns per tile: the whole row, or TILE at a time of a row wider than that."""
    return max(1, min(math.prod(shape[1:]) if len(shape) >= 2 else math.prod(shape), TILE))


def sum_parts(partials: Sequence[torch.Tensor]) -> torch.Tensor:
    """Totals [k] of a tensor's partial sums [parts, k] (`block_sums`) given in order: the same float64 operation
    on the same parts whether the tensor came whole or in blocks."""
    return torch.cat([p.to("cpu", torch.float64) for p in partials]).sum(dim=0)


def recorded(state: dict[str, Any]) -> dict[str, Any]:
    """The part of a method's state that is recorded with the merge (the run-only keys left out)."""
    return {key: value for key, value in state.items() if not key.startswith(RUN_ONLY)}


class MethodParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def matches_any(name: str, patterns: Sequence[str]) -> bool:
    """Whether any regex in `patterns` is found in the tensor name `name`."""
    return any(re.search(pattern, name) for pattern in patterns)


def check_patterns(patterns: Sequence[str]) -> tuple[str, ...]:
    """`patterns` as a tuple, after checking that each compiles (a clear error naming the bad one)."""
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"invalid tensor-name pattern {pattern!r}: {exc}") from None
    return tuple(patterns)


class ExcludeParams(MethodParams):
    """Parameters of a per-layer method: regexes of 2-D tensors it averages instead of merging."""

    exclude: tuple[str, ...] = Field((), description="regexes of 2-D tensors to average instead (the reference's "
                                     "exclude_keys)")

    _patterns = field_validator("exclude")(check_patterns)


class MergeMethod(ABC):
    name: ClassVar[str]
    summary: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    needs_objective: ClassVar[bool] = False  # learns from unlabeled data through `ExpertPool.objective`
    # a parameter that only multiplies the whole update (merged = theta_0 + scaling * U): sweeps rescale U
    scaling_param: ClassVar[str | None] = None
    # the params `prepare` reads (None: all of them): the sparsify stage's cache key, so e.g. TIES's thresholds
    # are computed once for every scaling of one density
    prepare_params: ClassVar[tuple[str, ...] | None] = None
    # merging costs about one read of the inputs, and the merged values carry every NaN/Inf of the inputs: the
    # engine checks the output as it goes (`ExpertPool.check_merged`) instead of reading the inputs in a pass of
    # their own first (which methods with heavy per-tensor work keep, to fail before that work)
    checks_inline: ClassVar[bool] = False
    # each coordinate merges on its own (given the state): the engine may hand `merge_tensor` blocks of rows of a
    # large tensor, with the flat index of the block's first coordinate in state[BLOCK_OFFSET]
    elementwise: ClassVar[bool] = False
    # each coordinate merges on its own given a few totals over the tensor (SLERP's norms and dot, DARE's L1 norms):
    # the engine may hand a tensor larger than its window in blocks of rows twice, each block first to `block_sums`,
    # then to `merge_tensor` with `sum_parts` of them in state[TENSOR_SUMS] (and the offset in state[BLOCK_OFFSET])
    two_pass: ClassVar[bool] = False
    # `prepare` only reads tensor names and counts (layer depths for gradients): no sparsify stage of its own
    prepare_is_cheap: ClassVar[bool] = False
    # the grid `sweep: default` tries and the one `method: auto` searches (None: the sweep grid; a method with
    # neither cannot be searched; {}: its defaults, one point), and whether auto searches it unless told otherwise
    sweep_grid: ClassVar[dict[str, list[Any]] | None] = None
    search_grid: ClassVar[dict[str, list[Any]] | None] = None
    searched_by_default: ClassVar[bool] = True
    # how many experts the method merges: (fewest, most or None); SLERP takes exactly one, Model Stock two or more
    expert_count: ClassVar[tuple[int, int | None]] = (1, None)
    # an iterative method's step or iteration counts (integer params: WUDI's Adam `steps`, MaTS's CG `max_iter`):
    # `auto`'s early rungs run a fraction of them (the count is a resource, as in Hyperband); (): it does not iterate
    fidelity: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: MethodParams | None = None):
        self.params = params if params is not None else self.Params()

    @classmethod
    def counts(cls, params: Mapping[str, Any]) -> dict[str, int]:
        """The value of each `fidelity` parameter at `params` (its default where `params` does not set it)."""
        chosen = cls.Params(**dict(params)) if cls.fidelity else None
        return {name: int(getattr(chosen, name)) for name in cls.fidelity}

    @classmethod
    def at_fidelity(cls, params: Mapping[str, Any], fraction: float) -> dict[str, Any]:
        """`params` with each `fidelity` count cut to ceil(fraction x count) (at least 1, at most the count). A count
        that does not change is not written, so at full fidelity, and for a method that does not iterate, the result
        equals `params`: the plain merge's own point, cache key and fingerprint."""
        full = cls.counts(params)
        cut = {name: min(count, max(1, math.ceil(fraction * count - 1e-9))) for name, count in full.items()}
        return {**params, **{name: value for name, value in cut.items() if value != full[name]}}

    @classmethod
    def fidelity_label(cls, scored: Mapping[str, Any], params: Mapping[str, Any]) -> str:
        """How the point `scored` ran against the full `params`: each count, "steps 100/400"; "full" for a method that
        does not iterate."""
        done, full = cls.counts(scored), cls.counts(params)
        return ", ".join(f"{name} {done[name]}/{full[name]}" for name in cls.fidelity) or "full"

    def check_expert_count(self, count: int) -> None:
        """A ConfigError naming the method when it cannot merge `count` experts (checked before any work)."""
        low, high = self.expert_count
        if count < low or (high is not None and count > high):
            wanted = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
            raise ConfigError(f"method {self.name!r} merges {wanted} expert{'s' if wanted != 'exactly 1' else ''}; "
                              f"got {count}")

    def subspace_kinds(self) -> tuple[str, ...]:
        """The stored per-layer factors this method reads (`mergeflow.subspace`: "task", "sum", "cts-<f>",
        "shared-<d>"), built once per expert set by the subspace stage and read through `stored_factors`; without
        them the method computes its own. Default: none."""
        return ()

    def prepare(self, pool: ExpertPool, *, progress: bool = False) -> dict[str, Any]:
        """Global statistics needed before any tensor is merged (default: none)."""
        return {}

    def prepare_merge(self, pool: ExpertPool, *, progress: bool = False) -> dict[str, Any]:
        """The global pass of one whole merge: `prepare`'s, less what the merge pass can compute as it goes and
        `finish` settles (default: `prepare`)."""
        return self.prepare(pool, progress=progress)

    @abstractmethod
    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: torch.Tensor,
                     state: dict[str, Any]) -> torch.Tensor:
        """Merged value of one float tensor, fp32 (or the dtype in state[OUT_DTYPE], where given). `base` is fp32
        [*shape]; `task_vectors` fp32 [N, *shape], the engine's buffer: a method may modify it but not return it.
        `state` is this merge's own copy: a method may keep run-only accumulators in it for `finish`."""

    def read_plan(self, pool: ExpertPool, keys: Sequence[str], state: dict[str, Any]
                  ) -> list[tuple[str, tuple[int, int] | None]]:
        """How the engine reads `keys`: (name, None) whole, (name, (first row, stop row)) a block of rows. Elementwise
        methods: blocks of at most half the window (`ExpertPool.plan_blocks`); two-pass methods: a tensor of two or
        more dimensions whose inputs take more than the window in such blocks, twice where it `needs_sums`; else
        whole tensors. Memory then stays within about twice the window, however large a tensor."""
        if self.elementwise:
            return pool.plan_blocks(keys)
        if not self.two_pass:
            return [(name, None) for name in keys]
        per_value, items = 4 * (len(pool.experts) + 1), []
        for name in keys:
            shape = pool.base.info(name).shape
            if len(shape) < 2 or per_value * math.prod(shape) <= pool.window:
                items.append((name, None))
                continue
            step = max(1, pool.window // 2 // (per_value * math.prod(shape[1:])))
            step = max(1, step // tile_rows(shape)) * tile_rows(shape)  # whole tiles: blocks sum as the tensor
            blocks = [(name, (row, min(row + step, shape[0]))) for row in range(0, shape[0], step)]
            items += blocks * (2 if self.needs_sums(name, state) else 1)
        return items

    def needs_sums(self, name: str, state: dict[str, Any]) -> bool:
        """Two-pass methods: whether tensor `name` needs totals (else blocks of it are read once). Default: yes."""
        return True

    def block_sums(self, name: str, base: torch.Tensor, task_vectors: torch.Tensor,
                   state: dict[str, Any]) -> torch.Tensor:
        """Two-pass methods: float64 [parts, k] partial sums over a block of rows (starting at a multiple of
        `tile_rows`, e.g. one part per tile) whose totals `merge_tensor` reads; it may modify `task_vectors` (read
        no more after it)."""
        raise NotImplementedError(f"{self.name} is not a two-pass method")

    def finish(self, state: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """After every tensor: corrections {name: (flat indices, fp32 values)} to tensors already merged, once a
        model-wide result computed during the pass is known (it may add recorded keys to `state`). Default: none."""
        return {}

    def grouping(self, state: dict[str, Any], device: torch.device) -> tuple[Sequence[str], int]:
        """(names, max_bytes): tensors to hand to `merge_group` and the cap on one group's task vectors, for a
        merge on `device`."""
        return (), 0

    def merge_group(self, names: Sequence[str], bases: torch.Tensor, task_vectors: torch.Tensor,
                    state: dict[str, Any]) -> torch.Tensor:
        """Merged values [G, *shape] of G same-shape tensors: `bases` fp32 [G, *shape], `task_vectors` fp32
        [G, N, *shape]. Default: `merge_tensor` on each."""
        return torch.stack([self.merge_tensor(name, base, tv, state)
                            for name, base, tv in zip(names, bases, task_vectors)])


SUBSPACE = "_subspace"  # run-only state key: {kind: reader of the subspace stage's stored factors}
WARM = "_warm"  # run-only state key: where iterative solvers keep their end states (`mergeflow.warm_start`)
POOL_INPUTS = (SUBSPACE, WARM)  # what `with_inputs` adds: not part of a merge's returned state


def with_inputs(state: dict[str, Any], pool: ExpertPool) -> dict[str, Any]:
    """`state` with what the pool gives a merge beyond tensors: the subspace readers (kind ->
    `mergeflow.subspace.SubspaceReader`) and the solvers' warm starts, when given."""
    extra = {**({SUBSPACE: dict(pool.subspaces)} if pool.subspaces else {}),
             **({WARM: pool.warm} if pool.warm is not None else {})}
    return {**state, **extra} if extra else state


def resume_for(state: dict[str, Any], names: Sequence[str]) -> Resume | None:
    """The warm start of a solve of the tensors `names`, when the merge keeps them (else None: from scratch)."""
    return Resume.of(state.get(WARM), names)


def stored_factors(state: dict[str, Any], kind: str, name: str) -> dict[str, torch.Tensor] | None:
    """The subspace stage's stored factors of one layer (`kind`: see `mergeflow.subspace`), when the merge was
    given them."""
    reader = state.get(SUBSPACE, {}).get(kind)
    return None if reader is None else reader.factors(name)


class PerLayerMethod(MergeMethod):
    """A method that merges each 2-D tensor on its own (TSV-M, Iso-C, Iso-CTS, WUDI): merged = theta_0 + scaling *
    `layer_update`; every other tensor, and a 2-D one matching `exclude`, gets theta_0 + scaling * mean tau."""

    Params: ClassVar[type[ExcludeParams]] = ExcludeParams

    @abstractmethod
    def layer_update(self, name: str, task_vectors: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """The unscaled update [m, n] of one 2-D tensor from its task vectors [T, m, n]."""

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: torch.Tensor,
                     state: dict[str, Any]) -> torch.Tensor:
        scaling = getattr(self.params, self.scaling_param)
        if task_vectors.dim() != 3 or matches_any(name, self.params.exclude):
            return base + scaling * task_vectors.mean(dim=0)
        return base + scaling * self.layer_update(name, task_vectors, state)
