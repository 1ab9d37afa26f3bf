"""Flat CPU buffers kept for reuse between tensors: fresh memory for every tensor costs more in page faults than
filling it (a 46 MB fp32 tensor: 39 ms fresh, 4 ms into kept memory, on this project's VM)."""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from typing import Any

import torch


class BufferPool:
    """`take(n)` a flat buffer of `n` elements: a kept one at most 4x that size (so small tensors leave the large
    buffers to the large ones), else fresh memory; `give(buffer)` back once its contents are no longer needed: the
    largest `count` are kept, within `max_bytes` when given."""

    def __init__(self, dtype: torch.dtype, count: int = 4):
        self.dtype, self.count = dtype, count
        self._kept: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, numel: int) -> torch.Tensor:
        with self._lock:
            fits = [i for i, kept in enumerate(self._kept) if numel <= kept.numel() <= 4 * numel]
            buffer = self._kept.pop(min(fits, key=lambda i: self._kept[i].numel())) if fits else None
        return torch.empty(numel, dtype=self.dtype) if buffer is None else buffer[:numel]

    def give(self, buffer: torch.Tensor, max_bytes: int | None = None) -> None:
        root = (buffer if buffer._base is None else buffer._base).reshape(-1)
        with self._lock:
            kept, used = [], 0
            for candidate in sorted([*self._kept, root], key=lambda t: t.numel(), reverse=True):
                size = candidate.numel() * candidate.element_size()
                if len(kept) < self.count and (max_bytes is None or used + size <= max_bytes):
                    kept.append(candidate)
                    used += size
            self._kept[:] = kept


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the operating system (glibc's `malloc_trim`; nothing elsewhere). A
    model's tensors of a few MB are carved from malloc's arenas, and once freed they stay in the process's RSS
    until reused (a served flow's process held 4.4 GB between the stages of a 1 B run without this)."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None  # the C library once loaded; False where it has no malloc_trim
