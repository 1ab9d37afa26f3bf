"""Progress bars that read well in a terminal and in a log file, and that are stop points.

In a terminal the bar redraws in place; elsewhere (a log file, a Prefect worker's captured output) it prints at
most one line every `LOG_INTERVAL` seconds, not one per step. Every step of a bar checks the stop flag
(`mergeflow.stopping`), so any loop that shows progress stops within one step of Ctrl-C, SIGTERM or a cancellation.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

from mergeflow import stopping

LOG_INTERVAL = 30.0  # seconds between progress lines when stderr is not a terminal


class _StoppableBar(tqdm):
    live = True  # redraws in place (a terminal)

    def __iter__(self):
        for item in super().__iter__():
            stopping.check()
            yield item

    def update(self, n: float | None = 1) -> bool | None:
        stopping.check()
        return super().update(n)

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=refresh and self.live, **kwargs)


def progress_bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """`tqdm(iterable, **kwargs)` that checks the stop flag on every step and prints sparingly outside a terminal."""
    stream = kwargs.get("file") or sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        kwargs.setdefault("mininterval", LOG_INTERVAL)
        kwargs.setdefault("maxinterval", LOG_INTERVAL * 4)
    bar = _StoppableBar(iterable, **kwargs)
    bar.live = "mininterval" not in kwargs or kwargs["mininterval"] < LOG_INTERVAL
    return bar
