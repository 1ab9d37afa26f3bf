"""Parameters as mergekit writes them: a number, a gradient over the layers, or values filtered by tensor name.

A `Setting` is one of
  0.5                                   every tensor;
  [0, 0.5, 1]                           a gradient: interpolated linearly across layer depth t in [0, 1];
  [{filter: self_attn, value: [0, 1]},  the value (a number or a gradient) of the first entry whose filter is a
   {value: 0.5}]                        substring of the tensor's name (no filter, or "*": every tensor).
Depth follows mergekit: layer i of L gets t = i / (L - 1) (t = 1 for a single layer); tensors outside the
numbered layers (embeddings, final norm, head) get t = 0. Layers are numbered per stack (`encoder.block.3` and
`decoder.block.3` count separately), found by name (`layers.N.`, `h.N.`, `block.N.`, `blocks.N.`, `resblocks.N.`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Union

from pydantic import BaseModel, ConfigDict


class Filtered(BaseModel):
    """One entry of a filtered setting: `value` for the tensors whose name contains `filter`."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    filter: str | None = None
    value: Union[float, tuple[float, ...]]


Setting = Union[float, tuple[float, ...], tuple[Filtered, ...]]

_LAYER = re.compile(r"^(.*?(?:^|\.)(?:layers|layer|h|block|blocks|resblocks))\.(\d+)\.")


def layer_of(name: str) -> tuple[str, int] | None:
    """(stack, index) of a tensor inside a numbered layer, e.g. ("model.layers", 3); None outside the layers."""
    match = _LAYER.match(name)
    return None if match is None else (match.group(1), int(match.group(2)))


def layer_counts(names: Iterable[str]) -> dict[str, int]:
    """Layers per stack of a model's tensors: {stack: highest index + 1}."""
    counts: dict[str, int] = {}
    for name in names:
        found = layer_of(name)
        if found is not None:
            counts[found[0]] = max(counts.get(found[0], 0), found[1] + 1)
    return counts


def depth(name: str, counts: Mapping[str, int]) -> float:
    """Depth t in [0, 1] of a tensor, mergekit's way (see the module's docstring)."""
    found = layer_of(name)
    if found is None or found[0] not in counts:
        return 0.0
    layers = counts[found[0]]
    return 1.0 if layers <= 1 else found[1] / (layers - 1)


def _interpolate(values: tuple[float, ...], t: float) -> float:
    if len(values) == 1:
        return float(values[0])
    scaled = t * (len(values) - 1)
    low = int(scaled)
    high = min(len(values) - 1, low + 1)
    frac = scaled - low
    return (1 - frac) * values[low] + frac * values[high]


def resolve(setting: Setting | None, name: str, t: float) -> float | None:
    """The value of `setting` for the tensor `name` at depth `t`; None when no filter matches (or no setting)."""
    if setting is None:
        return None
    if isinstance(setting, (int, float)):
        return float(setting)
    if not setting:
        return None
    if all(isinstance(entry, (int, float)) for entry in setting):
        return _interpolate(tuple(setting), t)
    for entry in setting:
        if entry.filter in (None, "*") or entry.filter in name:
            return float(entry.value) if isinstance(entry.value, (int, float)) else _interpolate(entry.value, t)
    return None


def numbers(setting: Setting | None) -> list[float]:
    """Every number a setting holds (to check ranges)."""
    if setting is None:
        return []
    if isinstance(setting, (int, float)):
        return [float(setting)]
    out: list[float] = []
    for entry in setting:
        if isinstance(entry, Filtered):
            out.extend(numbers(entry.value))
        else:
            out.append(float(entry))
    return out


def check_range(setting: Setting | None, field: str, accept: Callable[[float], bool], bounds: str) -> Setting | None:
    """`setting` unchanged when every number in it is accepted; a ValueError naming the field and value if not."""
    if isinstance(setting, tuple) and not setting:
        raise ValueError(f"{field}: an empty list sets nothing")
    for value in numbers(setting):
        if not accept(value):
            raise ValueError(f"{field}: {value} is outside {bounds}")
    return setting

