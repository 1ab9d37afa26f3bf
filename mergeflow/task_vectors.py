"""Task-vector algebra (tau_i = theta_i - theta_0) over tensor sources, computed in fp32 one tensor at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

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
    (AdaMerging) minimise `objective`.
    """

    base: TensorSource
    experts: Sequence[TensorSource]
    names: Sequence[str]
    device: torch.device = torch.device("cpu")
    statistics: Sequence[TensorSource] | None = None
    objective: Objective | None = None

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
