"""Readable progress of a flow run: one line per stage as it starts and as it ends, with the run's elapsed time
and, once the flow has said what it will run (`plan`), the stages done and an estimate of the time left (each
pending stage costs the mean of the finished stages of its kind; stages of kinds not yet timed are counted apart);
and one line as a long upload inside a stage starts and one as it ends (`upload`)."""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class RunClock:
    """Stage timings of the flow run in this process (threads share it; a worker process has its own)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.plan({})

    def __getstate__(self) -> dict:  # a copy travels with a task pickled for a Dask or process worker
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def plan(self, planned: Mapping[str, int]) -> None:
        """Start the clock for a run that will do `planned[kind]` stages of each kind."""
        with self._lock:
            self.started_at = time.monotonic()
            self.planned = Counter({k: v for k, v in planned.items() if v > 0})
            self.done: dict[str, list[float]] = defaultdict(list)

    def remaining(self) -> tuple[float, int]:
        """(estimated seconds left for the pending stages of kinds already timed, pending stages of kinds not yet
        timed): a kind's stages take the mean of its finished ones."""
        left, untimed = 0.0, 0
        for kind, count in self.planned.items():
            times = self.done.get(kind, [])
            pending = max(0, count - len(times))
            if times:
                left += pending * sum(times) / len(times)
            else:
                untimed += pending
        return left, untimed

    def means(self) -> dict[str, float]:
        """Mean seconds of the finished stages of each kind (what `mergeflow plan` expects of the next run)."""
        with self._lock:
            return {kind: round(sum(times) / len(times), 3) for kind, times in self.done.items() if times}

    def started(self, kind: str, name: str) -> str:
        return self.line(f"start {name}")

    def line(self, text: str) -> str:
        """`text` after the run's elapsed time, as the stage lines have it."""
        return f"[{_clock(time.monotonic() - self.started_at)}] {text}"

    def finished(self, kind: str, name: str, seconds: float, outcome: str = "done") -> str:
        with self._lock:
            if outcome == "done":
                self.done[kind].append(seconds)
            line = f"[{_clock(time.monotonic() - self.started_at)}] {outcome:5s} {name} in {seconds:.1f} s"
            if self.planned:
                total = sum(self.planned.values())
                count = min(total, sum(len(v) for k, v in self.done.items() if k in self.planned))
                left, untimed = self.remaining()
                line += f" ({count}/{total} stages done; about {_clock(left)} left"
                line += f" + {untimed} stages of kinds not yet timed)" if untimed else ")"
        return line


CLOCK = RunClock()


@contextmanager
def upload(what: str, local_dir: Path, destination: str) -> Iterator[None]:
    """Print one line as the files under `local_dir` start uploading to `destination` (their size) and one when the
    upload inside the block ended (its seconds and MB/s); a failed upload prints nothing more (its stage says)."""
    files = [path for path in Path(local_dir).rglob("*") if path.is_file()]
    size = sum(path.stat().st_size for path in files)
    count = f"{len(files)} file" + ("" if len(files) == 1 else "s")
    print(CLOCK.line(f"upload {what}: {size / 1e9:.2f} GB ({size:,} bytes, {count}) to {destination}"), flush=True)
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    print(CLOCK.line(f"uploaded {what}: {size / 1e9:.2f} GB in {seconds:.1f} s "
                     f"({size / 1e6 / max(seconds, 1e-6):.1f} MB/s)"), flush=True)
