"""Helper threads (`mergeflow.parallel`: the worker pool, the read-ahead thread) run torch on one intra-op thread,
and leave the main thread's own setting as it was."""

from __future__ import annotations

import torch

import mergeflow.parallel as parallel


def test_pool_workers_and_read_ahead_run_torch_on_one_thread(monkeypatch):
    main_threads = torch.get_num_threads()
    monkeypatch.setattr(parallel, "workers", lambda: 2)  # a pool even on a one-core machine
    monkeypatch.setattr(parallel, "_pool", None)  # a fresh pool, built with this module's initializer
    try:
        seen = parallel.parallel_map(lambda _: torch.get_num_threads(), range(4))
        ahead = list(parallel.read_ahead(lambda _: torch.get_num_threads(), [0, 1, 2], lambda _: 1, window=1))
    finally:
        if parallel._pool is not None:
            parallel._pool.shutdown()
    assert seen == [1, 1, 1, 1] and ahead == [1, 1, 1]
    assert torch.get_num_threads() == main_threads
