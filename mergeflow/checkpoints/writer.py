"""Streaming writer of Hugging Face-style sharded safetensors.

The tensor list (names, shapes, dtypes) is known before the merge starts, so shard boundaries and every header
are fixed up front and each tensor's bytes go straight to disk as it is produced: memory holds one tensor at a
time, whatever the model size. One shard is written as `model.safetensors`; more as
`model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from mergeflow.buffers import BufferPool
from mergeflow.checkpoints.reader import SAFETENSORS_INDEX, TensorInfo
from mergeflow.checkpoints.safetensors_format import DTYPE_NAMES, element_size, encode_header
from mergeflow.errors import ConfigError
from mergeflow.selection import is_float
from mergeflow.storage import sha256_file

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as '2GB', '500MB' or '1GiB'."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", size.upper())
    if not match:
        raise ValueError(f"invalid size {size!r} (examples: 2GB, 500MB, 1GiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def _nbytes(info: TensorInfo) -> int:
    n = element_size(info.dtype)
    for d in info.shape:
        n *= d
    return n


class ShardedSafetensorsWriter:
    """Write the planned tensors (in any order) into shards of at most `shard_size` bytes each.

    Writes happen on a background thread (at most `pending` bytes queued), so the disk works while the caller
    computes the next tensor; a shard written front to back is hashed as it is written, others are hashed again at
    `close`. An error of a background write is raised by the next call.
    """

    def __init__(self, directory: Path, plan: Sequence[TensorInfo], *, shard_size: int | str = "2GB",
                 metadata: dict[str, str] | None = None, pending: int = 256 << 20):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        limit = parse_size(shard_size)
        groups: list[list[TensorInfo]] = [[]]
        used = 0
        for info in plan:
            size = _nbytes(info)
            if groups[-1] and used + size > limit:
                groups.append([])
                used = 0
            groups[-1].append(info)
            used += size
        n = len(groups)
        self.shard_names = (["model.safetensors"] if n == 1
                            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self._slots: dict[str, tuple[int, int, TensorInfo]] = {}  # name -> (shard index, absolute offset, info)
        self._files = []
        self._hashes = []  # per shard: sha256 of its bytes written in order so far, and where that prefix ends
        for index, (shard, group) in enumerate(zip(self.shard_names, groups)):
            entries, offset = {}, 0
            for info in group:
                size = _nbytes(info)
                entries[info.name] = {"dtype": DTYPE_NAMES[info.dtype], "shape": list(info.shape),
                                      "data_offsets": [offset, offset + size]}
                offset += size
            header = encode_header(entries, metadata)
            handle = open(self.directory / shard, "w+b")
            handle.write(header)
            handle.truncate(len(header) + offset)
            self._files.append(handle)
            self._hashes.append([hashlib.sha256(header), len(header)])
            for info in group:
                start = entries[info.name]["data_offsets"][0]
                self._slots[info.name] = (index, len(header) + start, info)
        self._written: set[str] = set()
        self._rows: dict[str, int] = {}  # rows written so far of tensors written in blocks
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mergeflow-writer")
        self._queue: deque[tuple[Future, int]] = deque()
        self._pending, self._limit = 0, pending
        self._memory = BufferPool(torch.uint8)  # `buffer`'s memory, back once written
        self._lent: dict[int, torch.Tensor] = {}  # out until written, by address

    def buffer(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """An empty CPU tensor to fill and hand to `write` or `write_rows` once: memory of tensors already written,
        taken back as they reach the file (fresh memory for every output costs more in page faults than filling
        it; a buffer over 4x the size is left to a larger tensor)."""
        memory = self._memory.take(math.prod(shape) * element_size(dtype))
        self._lent[memory.data_ptr()] = memory
        return memory.view(dtype).view(tuple(shape))

    def _take_back(self, data: torch.Tensor) -> None:
        memory = self._lent.pop(data.untyped_storage().data_ptr(), None)
        if memory is not None:
            self._memory.give(memory)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._slots:
            raise KeyError(f"tensor {name!r} is not in the output plan")
        if name in self._written:
            raise ValueError(f"tensor {name!r} written twice")
        index, offset, info = self._slots[name]
        if tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
            raise ValueError(f"tensor {name!r}: got {tuple(tensor.shape)} {tensor.dtype}, "
                             f"planned {info.shape} {info.dtype}")
        self._submit(index, offset, tensor)
        self._written.add(name)

    def write_rows(self, name: str, start: int, tensor: torch.Tensor) -> None:
        """Write rows [start, start + len(tensor)) of a planned tensor (blocks of one tensor, in any order)."""
        if name not in self._slots:
            raise KeyError(f"tensor {name!r} is not in the output plan")
        index, offset, info = self._slots[name]
        if not info.shape or tuple(tensor.shape[1:]) != info.shape[1:] or tensor.dtype != info.dtype \
                or start < 0 or start + len(tensor) > info.shape[0]:
            raise ValueError(f"tensor {name!r}: rows {start}+{tuple(tensor.shape)} {tensor.dtype} do not fit "
                             f"the planned {info.shape} {info.dtype}")
        self._submit(index, offset + start * (_nbytes(info) // info.shape[0]), tensor)
        self._rows[name] = self._rows.get(name, 0) + len(tensor)
        if self._rows[name] >= info.shape[0]:
            self._written.add(name)

    def _submit(self, index: int, offset: int, tensor: torch.Tensor) -> None:
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        while self._queue and (self._pending + data.numel() > self._limit or self._queue[0][0].done()):
            done, size = self._queue.popleft()
            done.result()  # a failed write raises here
            self._pending -= size
        self._queue.append((self._pool.submit(self._write_at, index, offset, data), data.numel()))
        self._pending += data.numel()

    def _write_at(self, index: int, offset: int, data: torch.Tensor) -> None:
        handle, digest = self._files[index], self._hashes[index]
        handle.seek(offset)
        if data.numel():
            view = memoryview(data.numpy())
            handle.write(view)
            if digest[1] == offset:  # the shard's next bytes in order: hashed now, not read again at close
                digest[0].update(view)
                digest[1] += data.numel()
            else:
                digest[1] = -1
        self._take_back(data)

    def _drain(self) -> None:
        while self._queue:
            done, size = self._queue.popleft()
            self._pending -= size
            done.result()

    def patch(self, name: str, index: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite the entries at flat `index` of a tensor already written with `values` (in its dtype)."""
        if name not in self._written:
            raise KeyError(f"tensor {name!r} has not been written, so it cannot be patched")
        self._drain()
        shard, offset, info = self._slots[name]
        data = torch.empty(_nbytes(info), dtype=torch.uint8)
        handle = self._files[shard]
        handle.seek(offset)
        if handle.readinto(memoryview(data.numpy())) != data.numel():
            raise OSError(f"{self.directory / self.shard_names[shard]}: could not read back {name!r}")
        data.view(info.dtype)[index] = values.to(info.dtype)
        handle.seek(offset)
        handle.write(memoryview(data.numpy()))
        self._hashes[shard][1] = -1  # changed after hashing: hashed again at close

    def close(self) -> dict[str, str]:
        """Finish the shards (and index); returns {file name: sha256} of everything written."""
        try:
            self._drain()
        finally:
            self._pool.shutdown()
            for handle in self._files:
                handle.close()
        missing = set(self._slots) - self._written
        if missing:
            raise ValueError(f"{len(missing)} planned tensors were never written, e.g. {sorted(missing)[0]!r}")
        digests = {}
        for shard, (digest, hashed) in zip(self.shard_names, self._hashes):
            whole = hashed == (self.directory / shard).stat().st_size
            digests[shard] = digest.hexdigest() if whole else sha256_file(self.directory / shard)
        if len(self.shard_names) > 1:
            total = sum(_nbytes(info) for _, _, info in self._slots.values())
            weight_map = {name: self.shard_names[index] for name, (index, _, _) in self._slots.items()}
            index_doc = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / SAFETENSORS_INDEX).write_text(json.dumps(index_doc, indent=2))
            digests[SAFETENSORS_INDEX] = sha256_file(self.directory / SAFETENSORS_INDEX)
        return digests

    def abort(self) -> None:
        for done, _ in self._queue:
            done.cancel()
        self._pool.shutdown(wait=True)
        self._queue.clear()
        for handle in self._files:
            handle.close()


def write_file(path: Path, plan: Sequence[TensorInfo], fill: Callable[[ShardedSafetensorsWriter], None]) -> str:
    """One safetensors file at `path` holding the planned tensors, which `fill(writer)` hands over one at a time
    (memory holds the tensors still queued, never the file); written whole or not at all. Returns its sha256."""
    path = Path(path)
    staged = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        writer = ShardedSafetensorsWriter(staged, plan, shard_size=2**62)
        try:
            fill(writer)
        except BaseException:
            writer.abort()
            raise
        digest = writer.close()["model.safetensors"]
        os.replace(staged / "model.safetensors", path)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return digest


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """An output dtype by name ("float32", "float16", "bfloat16"); None stays None (the base's dtype)."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ConfigError(f"out_dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def output_plan(infos: Sequence[TensorInfo], out_dtype: torch.dtype | None) -> list[TensorInfo]:
    """The output's tensors: the base's, float ones in `out_dtype` when given."""
    return [replace(info, dtype=out_dtype) if out_dtype is not None and is_float(info.dtype) else info
            for info in infos]
