"""Task-vector algebra (tau_i = theta_i - theta_0) over tensor sources, computed in fp32 one tensor at a time."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from mergeflow.buffers import BufferPool
from mergeflow.checkpoints.adapter import LoraExpert
from mergeflow.checkpoints.reader import TensorInfo, TensorSource
from mergeflow.errors import ConfigError, OverflowInMergeError
from mergeflow.parallel import parallel_map, read_ahead
from mergeflow.selection import is_float

DEFAULT_WINDOW = 1 << 28  # bytes of fp32 tensors read ahead of the merge (base + N task vectors each)

# An unsupervised objective over merged tensors (name -> tensor), called once per optimisation step with the step
# number; differentiable w.r.t. the tensors. AdaMerging's is the prediction entropy on unlabeled inputs.
Objective = Callable[[Mapping[str, torch.Tensor], int], torch.Tensor]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' means CUDA when present, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class ExpertPool:
    """The inputs of a merge: a base model and N experts with identical keys, shapes and dtypes.

    Every method receives one of these (the FusionBench `run(pool)` contract): data-free methods read task
    vectors from it; data-aware methods also read each expert's statistics (`mergeflow.statistics`), one
    source per expert in the experts' order, keyed `<parameter>::<kind>`; methods that learn their coefficients
    (AdaMerging) minimise `objective`; subspace methods read the stored per-layer factors in `subspaces`, when the
    subspace stage built them.
    """

    base: TensorSource
    experts: Sequence[TensorSource]
    names: Sequence[str]
    device: torch.device = torch.device("cpu")
    statistics: Sequence[TensorSource] | None = None
    objective: Objective | None = None
    subspaces: Mapping[str, Any] | None = None  # kind -> stored per-layer factors (mergeflow.subspace.SubspaceReader)
    warm: Any = None  # where iterative methods keep and find their solver states (mergeflow.warm_start.WarmStarts)
    # reject NaN/Inf found in the merged tensors (`check_merged`; the engine sets this instead of a pass of its own
    # for methods that read the inputs once); `window`: bytes `stream` may hold ahead of its consumer
    check_finite: bool = False
    window: int = DEFAULT_WINDOW
    _spares: BufferPool = field(default_factory=lambda: BufferPool(torch.float32), repr=False)  # `stream`'s buffers
    _copies: Any = field(default=None, repr=False)  # CUDA only: the read-ahead thread's copy stream
    out_buffers: Callable[[Sequence[int], torch.dtype], torch.Tensor] | None = None  # the writer's `buffer`

    def infos(self) -> list[TensorInfo]:
        return [self.base.info(k) for k in self.base.keys()]

    def float_keys(self) -> list[str]:
        return [info.name for info in self.infos() if is_float(info.dtype)]

    def base_tensor(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The base's tensor `name` (its `rows` [start, stop) when given) in fp32 on the pool's device."""
        return self._on_device(self.base.get(name) if rows is None else self.base.get_rows(name, *rows))

    def _on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":  # CUDA only: from pinned memory, asynchronous on the current stream
            return tensor.pin_memory().to(self.device, torch.float32, non_blocking=True)
        return tensor.to(self.device, torch.float32)

    def task_vectors(self, name: str, base: torch.Tensor | None = None, out: torch.Tensor | None = None,
                     rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Stacked [N, *shape] fp32 task vectors of one tensor (of its `rows` [start, stop) when given; `base`:
        the same rows of the base in fp32), on the pool's device (into `out` when given)."""
        base = self.base_tensor(name, rows) if base is None else base
        if out is None:
            out = torch.empty((len(self.experts), *base.shape), dtype=torch.float32, device=self.device)

        def one(i: int) -> None:
            expert = self.experts[i]
            if isinstance(expert, LoraExpert):  # scale * B @ A itself, not (W0 + delta) - W0
                out[i] = expert.task_vector(name, base, rows)
            else:
                with _read_once(expert, name, rows, self.device) as tensor:
                    if self.device.type != "cpu" or not tensor.is_floating_point():
                        tensor = self._on_device(tensor)
                    if tensor.dtype in (torch.bfloat16, torch.float16):  # widened exactly, one fp32 subtraction:
                        out[i].copy_(tensor).sub_(base)  # the same values, 5x faster than a mixed-dtype torch.sub
                    else:
                        torch.sub(tensor, base, out=out[i])

        parallel_map(one, range(len(self.experts)))  # reads and subtractions of several experts at once
        return out

    def statistic(self, key: str) -> torch.Tensor:
        """Stacked [N, *shape] fp32 statistic `key` (e.g. `fc.weight::gram_in`) of every expert, on the device."""
        if self.statistics is None:
            raise ConfigError(f"statistic {key!r} is needed, but no statistics were given for the experts")
        return torch.stack([source.get(key).to(self.device, torch.float32) for source in self.statistics])

    def stream(self, keys: Sequence[str] | None = None) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """(name, base fp32, task vectors [N, *shape] fp32) for each of `keys` (default: every float tensor), in
        order; a background thread reads and subtracts the next tensors while the caller works on this one, within
        `window` bytes. The task vectors are valid until the caller asks for the next tensor: their buffers are
        reused (fresh pages cost more than the subtraction that fills them)."""
        keys = self.float_keys() if keys is None else list(keys)
        for name, _, base, task_vectors in self._read_ahead([(name, None) for name in keys]):
            yield name, base, task_vectors

    def blocks(self, keys: Sequence[str]) -> Iterator[tuple[str, int, torch.Tensor, torch.Tensor]]:
        """As `stream`, but a tensor whose base and task vectors would take more than half the window comes in
        blocks of rows: (name, first row, base rows, task vectors [N, rows, ...]). Memory then stays within the
        window whatever the number of experts (for methods that merge each coordinate on its own)."""
        for name, rows, base, task_vectors in self._read_ahead(self.plan_blocks(keys)):
            yield name, 0 if rows is None else rows[0], base, task_vectors

    def plan_blocks(self, keys: Sequence[str]) -> list[tuple[str, tuple[int, int] | None]]:
        """The items of `blocks`: (name, None) for a whole tensor, (name, (first row, stop row)) for a block."""
        per_value = 4 * (len(self.experts) + 1)
        items: list[tuple[str, tuple[int, int] | None]] = []
        for name in keys:
            shape = self.base.info(name).shape
            rows, row_cost = (shape[0], per_value * math.prod(shape[1:])) if shape else (1, per_value)
            step = max(1, self.window // 2 // row_cost)
            items += [(name, None)] if step >= rows else [(name, (r, min(r + step, rows)))
                                                          for r in range(0, rows, step)]
        return items

    def _read_ahead(self, items: list[tuple[str, tuple[int, int] | None]]
                    ) -> Iterator[tuple[str, tuple[int, int] | None, torch.Tensor, torch.Tensor]]:
        per_value = 4 * (len(self.experts) + 1)

        def cost(item: tuple[str, tuple[int, int] | None]) -> int:
            shape = self.base.info(item[0]).shape
            rows = item[1][1] - item[1][0] if item[1] is not None else (shape[0] if shape else 1)
            return per_value * rows * math.prod(shape[1:])

        stream = read_ahead(self._read, items, cost, self.window, release=lambda item: self._recycle(item[3]))
        try:
            yield from stream
        finally:
            stream.close()

    def _read(self, item: tuple[str, tuple[int, int] | None]
              ) -> tuple[str, tuple[int, int] | None, torch.Tensor, torch.Tensor]:
        if self.device.type == "cuda":  # CUDA only: this thread's copies run on a stream of their own, so they
            # overlap the merge's kernels on the default stream, which then owns the tensors
            self._copies = self._copies or torch.cuda.Stream(self.device)
            with torch.cuda.stream(self._copies):
                read = self._read_on_device(*item)
            self._copies.synchronize()
            for tensor in read[2:]:
                tensor.record_stream(torch.cuda.default_stream(self.device))
            return read
        return self._read_on_device(*item)

    def _read_on_device(self, name: str, rows: tuple[int, int] | None
                        ) -> tuple[str, tuple[int, int] | None, torch.Tensor, torch.Tensor]:
        """The base in fp32 and the task vectors, on the CPU in one buffer [N + 1, *shape] that is recycled once the
        consumer moves on (a fresh 46 MB buffer costs ten times its copy in page faults): both are valid until then."""
        if self.device.type != "cpu":
            base = self.base_tensor(name, rows)
            return name, rows, base, self.task_vectors(name, base, None, rows)
        shape = self.base.info(name).shape
        shape = shape if rows is None else (rows[1] - rows[0], *shape[1:])
        numel = math.prod(shape)
        flat = self._spares.take((len(self.experts) + 1) * numel)
        with _read_once(self.base, name, rows, self.device) as raw:
            base = flat[:numel].view(shape).copy_(raw)
        return name, rows, base, self.task_vectors(name, base, flat[numel:].view(len(self.experts), *shape), rows)

    def output(self, merged: torch.Tensor, dtype: torch.dtype, base: torch.Tensor) -> torch.Tensor:
        """A method's result in `dtype` on the CPU, never in the recycled buffer of `base` (a method may return the
        base itself, or its fp32 result in the task vectors' buffer: the writer may still hold it when the buffer is
        refilled); converted into `out_buffers` memory (the writer's, reused) where given."""
        cpu = base.device.type == "cpu"
        recycled = cpu and merged.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
        if self.out_buffers is not None and cpu and (recycled or merged.dtype != dtype):
            return self.out_buffers(merged.shape, dtype).copy_(merged)
        return merged.clone() if recycled and merged.dtype == dtype else merged.to("cpu", dtype)

    def check_merged(self, name: str, merged: torch.Tensor) -> None:
        """With `check_finite`: a non-finite merged tensor (or block) names the input file and tensor at fault.
        The methods that check inline carry every NaN and Inf of their inputs into the output (through sums,
        masks that keep them, products with 0), so one reduction over the output checks N + 1 inputs."""
        if not self.check_finite or bool(torch.isfinite(merged.sum())) or bool(torch.isfinite(merged).all()):
            return
        from mergeflow.validation import require_finite
        for source in (self.base, *self.experts):
            require_finite(source, name)
        raise OverflowInMergeError(f"merging tensor {name!r} gives values beyond float32 (every input is finite: "
                                   "are the coefficients too large?)")

    def _recycle(self, task_vectors: torch.Tensor) -> None:
        """Keep the buffers `stream` has handed out (each a base and its task vectors), the largest four within the
        window, for the next tensors (on the CPU: CUDA's caching allocator does this itself)."""
        if task_vectors.device.type != "cuda":
            self._spares.give(task_vectors, max_bytes=self.window)


def _read_once(source: TensorSource, name: str, rows: tuple[int, int] | None, device: torch.device
               ) -> AbstractContextManager[torch.Tensor]:
    """A tensor (or its rows) to copy inside the block: on the CPU into the checkpoint's reusable buffer."""
    if device.type == "cpu" and hasattr(source, "scratch"):
        return source.scratch(name, rows)
    return nullcontext(source.get(name) if rows is None else source.get_rows(name, *rows))


@contextmanager
def open_pool(base_uri: str, experts: Mapping[str, str], device: str | torch.device = "auto",
              storage_options: Mapping[str, Any] | None = None, cache: Any = None,
              statistics: Sequence[str] | None = None) -> Iterator[ExpertPool]:
    """Open the base and each expert checkpoint (name -> URI; lazily, tensor by tensor; an expert may be a LoRA
    adapter directory) and, for data-aware methods, each expert's `statistics` file (in the experts' order,
    checked against the base) as one pool; close every file opened on exit, also when a later one fails."""
    from mergeflow.checkpoints import open_checkpoint
    from mergeflow.checkpoints.adapter import open_expert
    from mergeflow.statistics import open_statistics, validate_statistics

    opened = []
    try:
        opened.append(open_checkpoint(base_uri, storage_options=storage_options, cache=cache))
        for uri in experts.values():
            opened.append(open_expert(uri, opened[0], storage_options=storage_options, cache=cache))
        stats = []
        for uri in statistics or ():
            stats.append(open_statistics(uri, storage_options=storage_options, cache=cache))
            opened.append(stats[-1])
        if statistics is not None:
            validate_statistics(opened[0], stats, len(experts))
        yield ExpertPool(opened[0], opened[1:len(experts) + 1], list(experts), resolve_device(device),
                         stats if statistics is not None else None)
    finally:
        for checkpoint in opened:
            checkpoint.close()


def shape_groups(infos: Sequence[TensorInfo], n_experts: int, max_bytes: int) -> list[list[TensorInfo]]:
    """Tensors of equal shape in order of appearance, cut so that each group's fp32 task vectors
    [G, N, *shape] take at most `max_bytes` (a single tensor is always a group)."""
    by_shape: dict[tuple[int, ...], list[list[TensorInfo]]] = {}
    for info in infos:
        chunks = by_shape.setdefault(tuple(info.shape), [[]])
        if chunks[-1] and (len(chunks[-1]) + 1) * n_experts * 4 * math.prod(info.shape) > max_bytes:
            chunks.append([])
        chunks[-1].append(info)
    return [chunk for chunks in by_shape.values() for chunk in chunks]
