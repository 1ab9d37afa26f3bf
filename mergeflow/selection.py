"""Which tensors are which: linear-layer weights (including fused attention `in_proj` weights) versus biases,
norms, embeddings and non-float buffers. Methods that only touch linear weights (DOGE, RegMean, MaTS) select
with `ParameterSelection`; name patterns override the heuristics."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch

from mergeflow.checkpoints.reader import TensorInfo


class ParamKind(str, Enum):
    LINEAR_WEIGHT = "linear_weight"
    BIAS = "bias"
    NORM = "norm"
    EMBEDDING = "embedding"
    OTHER = "other"  # convolutions, scalars (logit_scale), projections stored as raw parameters
    NON_FLOAT = "non_float"  # integer/bool buffers such as position_ids: carried through unchanged


_NORM = re.compile(r"(^|[._])(layer_?norm\d*|ln_?\w*|norm\d*|batch_?norm\d*|bn\d*|rms_?norm\d*)([._]|$)",
                   re.IGNORECASE)
_EMBEDDING = re.compile(r"(embed|embedding|embeddings|wte|wpe|positional|position|token_type|class_embedding"
                        r"|shared)", re.IGNORECASE)


def is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def classify(info: TensorInfo) -> ParamKind:
    """Heuristic kind of a tensor from its name, shape and dtype."""
    name = info.name
    if not is_float(info.dtype):
        return ParamKind.NON_FLOAT
    leaf = name.rsplit(".", 1)[-1]
    if _NORM.search(name):
        return ParamKind.NORM
    if leaf.endswith("bias"):
        return ParamKind.BIAS
    if _EMBEDDING.search(name):
        return ParamKind.EMBEDDING
    if len(info.shape) == 2 and leaf.endswith("weight"):  # nn.Linear weight, or fused in_proj_weight
        return ParamKind.LINEAR_WEIGHT
    return ParamKind.OTHER


@dataclass(frozen=True)
class ParameterSelection:
    """Select tensors by kind, then apply `include` / `exclude` regular expressions (searched in the name).

    `include` adds tensors regardless of kind; `exclude` removes them; both win over the kinds.
    """

    kinds: frozenset[ParamKind] = frozenset({ParamKind.LINEAR_WEIGHT})
    include: Sequence[str] = field(default_factory=tuple)
    exclude: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for pattern in (*self.include, *self.exclude):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid parameter-selection pattern {pattern!r}: {exc}") from None

    def selects(self, info: TensorInfo) -> bool:
        if not is_float(info.dtype):
            return False
        if any(re.search(p, info.name) for p in self.exclude):
            return False
        return classify(info) in self.kinds or any(re.search(p, info.name) for p in self.include)

    def select(self, infos: Iterable[TensorInfo]) -> list[str]:
        return [info.name for info in infos if self.selects(info)]
