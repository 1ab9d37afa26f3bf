"""Helper threads (`mergeflow.parallel`: the worker pool, the read-ahead thread) run torch on one intra-op thread,
and leave every other thread's count as it was: the thread that called them, and a thread started afterwards."""

from __future__ import annotations

import threading

import pytest
import torch

import mergeflow.parallel as parallel


@pytest.mark.skipif(parallel._openmp_set_num_threads() is None, reason="no OpenMP runtime found (Linux only)")
def test_helper_threads_run_torch_on_one_thread_and_no_other_thread_changes(monkeypatch):
    main_threads = torch.get_num_threads()
    monkeypatch.setattr(parallel, "workers", lambda: 2)  # a pool even on a one-core machine
    monkeypatch.setattr(parallel, "_pool", None)  # a fresh pool, built with this module's initializer
    try:
        seen = parallel.parallel_map(lambda _: torch.get_num_threads(), range(4))
        ahead = list(parallel.read_ahead(lambda _: torch.get_num_threads(), [0, 1, 2], lambda _: 1, window=1))
    finally:
        if parallel._pool is not None:
            parallel._pool.shutdown()
    later: list[int] = []  # a thread started after them (a flow's next task thread) takes torch's own count
    thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    thread.start(), thread.join()
    assert seen == [1, 1, 1, 1] and ahead == [1, 1, 1]
    assert torch.get_num_threads() == main_threads and later == [main_threads]
