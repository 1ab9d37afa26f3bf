"""Using every core: a shared worker pool for per-task work, and read-ahead of the next tensors while the current
one is merged. Torch operations release the GIL, so plain threads run them in parallel.

Each of these threads runs torch on one intra-op thread (`single_threaded_torch`): the pool already spreads the work
over the cores, and a helper thread left with torch's default gets an OpenMP team of its own, after which MKL's
LAPACK in the working thread runs 2.5-3x slower for the rest of the process (a 384 x 384 float64 `eigh` 10 -> 25-38 ms,
measured on 2 cores; `python benchmarks/helper_threads.py`)."""

from __future__ import annotations

import functools
import os
import re
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def single_threaded_torch() -> None:
    """Make torch run on one intra-op thread in the calling thread only (a helper thread's initializer), by the
    per-thread setting of the OpenMP runtime torch loaded: `torch.set_num_threads(1)` would also become the count
    that every thread started later takes (a flow's next task thread would run its matmuls on one core). A no-op
    where that runtime is not found (not Linux)."""
    import torch

    torch.get_num_threads()  # torch's own per-thread set-up first: it would overwrite the setting below
    if (set_threads := _openmp_set_num_threads()) is not None:
        set_threads(1)


@functools.cache
def _openmp_set_num_threads() -> Callable[[int], None] | None:
    """`omp_set_num_threads` of the OpenMP runtime loaded in this process (libgomp, libiomp5 or libomp), or None."""
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            found = {line.split()[-1] for line in maps if re.search(r"/lib(g|i)?omp[^/]*\.so", line)}
        paths = sorted(found, key=lambda path: ("/torch/" not in path, path))  # torch's own runtime first
    except OSError:
        return None
    for path in paths:
        try:
            return ctypes.CDLL(path).omp_set_num_threads
        except (OSError, AttributeError):
            continue
    return None


def workers() -> int:
    """Threads for per-task work: the cores this process may use."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def parallel_map(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """`[fn(x) for x in items]`, run on the shared worker threads (in order; the first error is raised)."""
    global _pool
    items = list(items)
    if len(items) < 2 or workers() < 2:
        return [fn(x) for x in items]
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(workers(), thread_name_prefix="mergeflow", initializer=single_threaded_torch)
    return list(_pool.map(fn, items))


def read_ahead(produce: Callable[[T], R], items: Sequence[T], cost: Callable[[T], int], window: int,
               release: Callable[[R], None] | None = None) -> Iterator[R]:
    """`produce(x)` for each item in order, computed by a background thread ahead of the consumer.

    Items in flight (produced and not yet passed on, plus the one the consumer holds) cost at most `window`
    bytes, by `cost(item)`, but two are always allowed (the one held and the next), however large. An error in
    `produce` is raised where that item would have been yielded. `release(result)` is called when the consumer
    moves past a result (e.g. to recycle its buffers). Closing the iterator (also by an exception or Ctrl-C in
    the consumer) stops the thread after the item it is producing.
    """
    ready: deque[tuple[bool, object, int]] = deque()  # (ok, result or exception, cost)
    state = {"flight": 0, "count": 0, "stop": False}
    changed = threading.Condition()

    def run() -> None:
        single_threaded_torch()
        for item in items:
            size = cost(item)
            with changed:
                changed.wait_for(lambda: state["stop"] or state["count"] < 2 or
                                 state["flight"] + size <= window)
                if state["stop"]:
                    return
                state["flight"] += size
                state["count"] += 1
            try:
                entry = (True, produce(item), size)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                entry = (False, exc, size)
            with changed:
                ready.append(entry)
                changed.notify_all()
            if not entry[0]:
                return

    thread = threading.Thread(target=run, name="mergeflow-read-ahead", daemon=True)
    thread.start()
    held: tuple[bool, object, int] | None = None
    try:
        for _ in items:
            if held is not None:  # the consumer is done with the previous item
                if release is not None:
                    release(held[1])  # type: ignore[arg-type]
                with changed:
                    state["flight"] -= held[2]
                    state["count"] -= 1
                    changed.notify_all()
                held = None
            with changed:
                changed.wait_for(lambda: bool(ready))
                held = ready.popleft()
            if not held[0]:
                raise held[1]  # type: ignore[misc]
            yield held[1]  # type: ignore[misc]
    finally:
        with changed:
            state["stop"] = True
            ready.clear()
            changed.notify_all()
        thread.join()
