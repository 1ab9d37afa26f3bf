"""Task-vector algebra (tau_i = theta_i - theta_0) over tensor sources, computed in fp32 one tensor at a time."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from mergeflow.checkpoints.lora import LoraExpert
from mergeflow.checkpoints.reader import TensorInfo, TensorSource
from mergeflow.errors import ConfigError
from mergeflow.selection import is_float

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

    def infos(self) -> list[TensorInfo]:
        return [self.base.info(k) for k in self.base.keys()]

    def float_keys(self) -> list[str]:
        return [info.name for info in self.infos() if is_float(info.dtype)]

    def base_tensor(self, name: str) -> torch.Tensor:
        return self.base.get(name).to(self.device, torch.float32)

    def task_vectors(self, name: str, base: torch.Tensor | None = None) -> torch.Tensor:
        """Stacked [N, *shape] fp32 task vectors of one tensor, on the pool's device."""
        base = self.base_tensor(name) if base is None else base
        out = torch.empty((len(self.experts), *base.shape), dtype=torch.float32, device=self.device)
        for i, expert in enumerate(self.experts):
            if isinstance(expert, LoraExpert):  # scale * B @ A itself, not (W0 + delta) - W0
                out[i] = expert.task_vector(name, base)
            else:
                torch.sub(expert.get(name).to(self.device, torch.float32), base, out=out[i])
        return out

    def statistic(self, key: str) -> torch.Tensor:
        """Stacked [N, *shape] fp32 statistic `key` (e.g. `fc.weight::gram_in`) of every expert, on the device."""
        if self.statistics is None:
            raise ConfigError(f"statistic {key!r} is needed, but no statistics were given for the experts")
        return torch.stack([source.get(key).to(self.device, torch.float32) for source in self.statistics])

    def iter_task_vectors(self, keys: Sequence[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.float_keys() if keys is None else keys:
            yield name, self.task_vectors(name)


@contextmanager
def open_pool(base_uri: str, experts: Mapping[str, str], device: str | torch.device = "auto",
              storage_options: Mapping[str, Any] | None = None, cache: Any = None,
              statistics: Sequence[str] | None = None) -> Iterator[ExpertPool]:
    """Open the base and each expert checkpoint (name -> URI; lazily, tensor by tensor; an expert may be a LoRA
    adapter directory) and, for data-aware methods, each expert's `statistics` file (in the experts' order,
    checked against the base) as one pool; close every file opened on exit, also when a later one fails."""
    from mergeflow.checkpoints import open_checkpoint
    from mergeflow.checkpoints.lora import open_expert
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
