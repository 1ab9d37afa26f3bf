"""What the data-aware methods (Fisher, RegMean, MaTS) share: finding which parameters carry the statistics they
need, checked before any compute, which weights are stored [in, out] (GPT-2's Conv1D: a Gram multiplies them from
the other side than an nn.Linear's [out, in] weight), and the off-diagonal shrink of Gram matrices.

A parameter is merged with its statistics when every expert has every kind the method needs for it, and simply
averaged when no expert has any; anything in between is an input error. The method keeps the pool it was
prepared on, because `merge_tensor` reads the statistics from it: always call `prepare` on the pool you merge.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch

from mergeflow.errors import ConfigError
from mergeflow.methods.base import RUN_ONLY, MergeMethod
from mergeflow.statistics import SEPARATOR, in_out_weights, split_statistic_key, statistic_key
from mergeflow.task_vectors import ExpertPool


IN_OUT = RUN_ONLY + "in_out"  # run-only state: the weights the statistics list as stored [in, out]


def covered_parameters(pool: ExpertPool, method: str, kinds: tuple[str, ...]) -> list[str]:
    """Float parameters of the base that have every statistic in `kinds` for every expert (sorted).

    ConfigError, naming the expert and statistic, when statistics are absent, fewer or more than the experts,
    hold no statistic of a needed kind, or cover a parameter for some experts but not for others.
    """
    wanted = ", ".join(f"'{SEPARATOR}{k}'" for k in kinds)
    if pool.statistics is None:
        raise ConfigError(f"method {method!r} needs statistics ({wanted}) for every expert; none were given "
                          "(pass one statistics file per expert, in the experts' order)")
    if len(pool.statistics) != len(pool.experts):
        raise ConfigError(f"method {method!r}: {len(pool.statistics)} statistics sources for "
                          f"{len(pool.experts)} experts (give exactly one per expert, in the same order)")
    floats = set(pool.float_keys())
    covered: set[str] | None = None
    for kind in kinds:
        per_expert = []
        for expert, source in zip(pool.names, pool.statistics):
            params = {p for p, k in map(split_statistic_key, source.keys()) if k == kind and p in floats}
            if not params:
                raise ConfigError(f"method {method!r} needs '{SEPARATOR}{kind}' statistics, but those of expert "
                                  f"{expert!r} ({source.label}) hold none")
            per_expert.append(params)
        for i, params in enumerate(per_expert[1:], start=1):
            if params != per_expert[0]:
                param = sorted(params ^ per_expert[0])[0]
                lacking, having = (i, 0) if param in per_expert[0] else (0, i)
                raise ConfigError(f"statistic {statistic_key(param, kind)!r} is missing for expert "
                                  f"{pool.names[lacking]!r} ({pool.statistics[lacking].label}) but given for expert "
                                  f"{pool.names[having]!r}; every expert needs the same statistics")
        covered = per_expert[0] if covered is None else covered & per_expert[0]
    return sorted(covered or ())


def shrink_off_diagonal(gram: torch.Tensor, ratio: float) -> torch.Tensor:
    """ratio * G + (1 - ratio) * diag(G) over the last two dimensions (RegMean's alpha, MaTS's model_lambda)."""
    if ratio == 1.0:
        return gram
    return ratio * gram + (1.0 - ratio) * torch.diag_embed(torch.diagonal(gram, dim1=-2, dim2=-1))


class DataAwareMethod(MergeMethod):
    """A method that merges with per-expert statistics from the pool; uncovered parameters are averaged."""

    @abstractmethod
    def statistic_kinds(self) -> tuple[str, ...]:
        """The statistic kinds (`mergeflow.statistics.KINDS`) a parameter needs to be merged with statistics."""

    def prepare(self, pool: ExpertPool, *, progress: bool = False) -> dict[str, Any]:
        covered = covered_parameters(pool, self.name, self.statistic_kinds())
        return {"covered": covered, RUN_ONLY + "pool": pool, IN_OUT: in_out_weights(pool.statistics or [])}

    def in_out(self, name: str, state: dict[str, Any]) -> bool:
        """Whether weight `name` is stored [in, out] (y = x W, GPT-2's Conv1D) rather than nn.Linear's [out, in]."""
        return name in state.get(IN_OUT, ())

    def statistic(self, name: str, kind: str, state: dict[str, Any]) -> torch.Tensor:
        """[N, ...] statistic `kind` of parameter `name` for every expert, from the pool `prepare` put in `state`."""
        pool = state.get(RUN_ONLY + "pool")
        if pool is None:
            raise ConfigError(f"method {self.name!r} reads statistics from its pool: call prepare(pool) first")
        return pool.statistic(statistic_key(name, kind))
