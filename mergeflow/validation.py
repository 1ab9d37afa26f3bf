"""Checks run before any compute: every expert matches the base key for key (shape and dtype), and no input
tensor holds NaN or Inf. Errors name the file and the tensor."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from mergeflow.progress import progress_bar

from mergeflow.checkpoints.reader import TensorSource
from mergeflow.errors import CheckpointError, ConfigError
from mergeflow.selection import is_float


def validate_compatible(base: TensorSource, experts: Sequence[TensorSource]) -> None:
    if not experts:
        raise ConfigError("a merge needs at least one expert")
    base_keys = base.keys()
    base_set = set(base_keys)
    for expert in experts:
        keys = set(expert.keys())
        missing = [k for k in base_keys if k not in keys]
        if missing:
            raise CheckpointError(expert.label, f"missing {len(missing)} tensor(s) that the base "
                                  f"{base.label} has", tensor=missing[0])
        extra = sorted(keys - base_set)
        if extra:
            raise CheckpointError(expert.label, f"has {len(extra)} tensor(s) that the base {base.label} lacks",
                                  tensor=extra[0])
        for name in base_keys:
            want, got = base.info(name), expert.info(name)
            if want.shape != got.shape:
                raise CheckpointError(expert.label, f"shape {list(got.shape)} differs from the base's "
                                      f"{list(want.shape)}", tensor=name)
            if want.dtype != got.dtype:
                raise CheckpointError(expert.label, f"dtype {got.dtype} differs from the base's {want.dtype}",
                                      tensor=name)


def check_finite(source: TensorSource, *, progress: bool = False, keys: Collection[str] | None = None) -> None:
    """Read every float tensor (of `keys`, default all) once and reject NaN or Inf."""
    names = [k for k in source.keys() if keys is None or k in keys]
    for name in progress_bar(names, desc=f"checking {source.label}", disable=not progress, leave=False):
        info = source.info(name)
        if not is_float(info.dtype):
            continue
        require_finite(source, name)


def require_finite(source: TensorSource, name: str) -> None:
    """Raise `CheckpointError` naming `source` and `name` if that tensor holds NaN or Inf."""
    tensor = source.get(name)
    # NaN and Inf propagate through a sum, so a finite sum proves a finite tensor (one fast reduction); only a
    # non-finite sum (a real NaN/Inf, or an overflow) needs the element-wise check.
    if bool(torch.isfinite(tensor.sum(dtype=torch.float64))):
        return
    if not bool(torch.isfinite(tensor).all()):
        nans = int(torch.isnan(tensor).sum())
        infs = int(torch.isinf(tensor).sum())
        raise CheckpointError(source.label, f"{nans} NaN and {infs} Inf value(s)", tensor=name)
