"""Peak RSS stage by stage: a sampler of a process tree's RSS every 0.5 s, and the stages' intervals read from the
run's progress lines (`HH:MM:SS.mmm | INFO | Task run '...' - [m:ss] start NAME` ... `done|stop  NAME`), so a peak
is attributed to the stages running at that instant (Prefect runs independent stages at once, in threads)."""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone

from stack_load import MemorySampler

GB = 1e9
EVENT = re.compile(r"^(?P<clock>\d\d:\d\d:\d\d\.\d+) \| \w+ +\|.*\] (?P<what>start|done|stop) +(?P<name>\S+)")


class TraceSampler(MemorySampler):
    """`MemorySampler` that also keeps every sample: (unix time, RSS bytes of the tree)."""

    def __init__(self, root_pid: int) -> None:
        super().__init__(root_pid)
        self.samples: list[tuple[float, int]] = []

    def run(self) -> None:
        while not self.stopped.wait(0.5):
            rss = self._tree_rss()
            self.samples.append((time.time(), rss))
            self.peak_tree = max(self.peak_tree, rss)


def stage_intervals(log_text: str, day: float) -> dict[str, tuple[float, float]]:
    """Stage name -> (start, end) in unix seconds, from the progress lines' clock (UTC) on the day of `day` (a name
    that runs again, e.g. two merges of one method, is listed as `name#2`)."""
    midnight = datetime.fromtimestamp(day, timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    starts, intervals = {}, {}
    for line in log_text.splitlines():
        if not (m := EVENT.search(line)):
            continue
        h, mi, s = m["clock"].split(":")
        t = midnight.timestamp() + int(h) * 3600 + int(mi) * 60 + float(s)
        if m["what"] == "start":
            starts[m["name"]] = t
        elif m["name"] in starts:
            start, name, again = starts.pop(m["name"]), m["name"], 1
            while name in intervals:
                again += 1
                name = f"{m['name']}#{again}"
            intervals[name] = (start, t if t >= start else t + 86400)
    return intervals


def stage_peaks(log_text: str, samples: list[tuple[float, int]]) -> list[str]:
    """Lines: the run's peak and the stages running then, and each stage kind's highest RSS while one ran."""
    if not samples:
        return ["memory trace: no samples"]
    intervals = stage_intervals(log_text, samples[0][0])
    peak_t, peak = max(samples, key=lambda s: s[1])
    running = sorted(name for name, (a, b) in intervals.items() if a <= peak_t <= b)
    lines = [f"peak RSS {peak / GB:.2f} GB at {datetime.fromtimestamp(peak_t, timezone.utc):%H:%M:%S} UTC, "
             f"while {', '.join(running) or 'no stage'} ran"]
    by_kind: dict[str, tuple[int, str]] = {}
    for name, (a, b) in intervals.items():
        inside = [rss for t, rss in samples if a <= t <= b]
        base = name.split("#", 1)[0]
        kind = base.split("-", 1)[0] + ("-validation" if base.endswith("-validation") else "")
        if inside and max(inside) > by_kind.get(kind, (0, ""))[0]:
            by_kind[kind] = (max(inside), name)
    idle = [rss for t, rss in samples if not any(a <= t <= b for a, b in intervals.values())]
    lines += [f"  {kind:22s} {rss / GB:5.2f} GB  ({name})"
              for kind, (rss, name) in sorted(by_kind.items(), key=lambda kv: -kv[1][0])]
    if idle:
        lines.append(f"  {'between stages':22s} {max(idle) / GB:5.2f} GB")
    return lines
