"""Settings read from the environment (`MERGEFLOW_*` waits and timeouts), with an error naming the variable."""

from __future__ import annotations

import os

from mergeflow.errors import ConfigError


def seconds(name: str, default: float) -> float:
    """The number of seconds environment variable `name` gives (`default` when unset or empty); a ConfigError
    naming it when it is not a non-negative number."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise ConfigError(f"{name}={raw!r}: expected a number of seconds")
    return value
