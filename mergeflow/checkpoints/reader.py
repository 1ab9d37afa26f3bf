"""Lazy, per-tensor checkpoint readers.

`open_checkpoint(uri)` accepts a local path, file:// or s3:// URI of a single `.safetensors` file, a Hugging Face
sharded layout (`model.safetensors.index.json` or the directory holding it), or a `.pt`/`.bin` state dict (loaded
with `weights_only=True` only). Remote objects go through the local content cache, so every input has a sha256.
Tensors are read one at a time on `get`, never the whole model.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from mergeflow.checkpoints.safetensors_format import DTYPES, decode_header, element_size
from mergeflow.errors import CheckpointError, UnsafeCheckpointError
from mergeflow.storage import filesystem, is_remote, join, storage_error
from mergeflow.content_cache import ContentCache, LocalObject

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


class TensorSource(Protocol):
    """Anything a merge reads tensors from: a checkpoint on storage or a state dict in memory."""

    label: str

    def keys(self) -> list[str]: ...

    def info(self, name: str) -> TensorInfo: ...

    def get(self, name: str) -> torch.Tensor: ...

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor's first dimension."""


class StateDictSource:
    """An in-memory state dict seen as a `TensorSource` (with a checkpoint's `metadata`, when given)."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], label: str = "<memory>",
                 metadata: Mapping[str, str] | None = None):
        self.label = label
        self._tensors = dict(state_dict)
        self.metadata = dict(metadata or {})

    def keys(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        t = self._tensors[name]
        return TensorInfo(name, tuple(t.shape), t.dtype)

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._tensors[name][start:stop]


def files_digest(files: Mapping[str, str]) -> str:
    """`Checkpoint.digest` of a checkpoint made of `files` (name -> sha256): the one file's sha256, or for a sharded
    checkpoint (its index and every shard it lists) the sha256 of their sorted 'name sha256' lines."""
    if len(files) == 1:
        return next(iter(files.values()))
    lines = "".join(f"{name} {sha256}\n" for name, sha256 in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


@dataclass(frozen=True)
class _Location:
    file: str  # key into Checkpoint.files
    start: int
    end: int


class Checkpoint:
    """A checkpoint on storage: its files (local copies with digests), tensor index and metadata."""

    def __init__(self, uri: str, files: dict[str, LocalObject], infos: dict[str, TensorInfo],
                 locations: dict[str, _Location], metadata: dict[str, str],
                 torch_tensors: dict[str, torch.Tensor] | None = None):
        self.uri = uri
        self.label = uri
        self.files = files
        self.metadata = metadata
        self._infos = infos
        self._locations = locations
        self._torch_tensors = torch_tensors
        self._handles: dict[str, int] = {}  # file -> OS descriptor
        self._lock = threading.Lock()
        self._scratch: torch.Tensor | None = None  # `scratch`'s reusable read buffer (bytes)

    @property
    def digest(self) -> str:
        """sha256 of the file, or for a sharded checkpoint of its sorted (file name, sha256) list."""
        return files_digest({name: obj.sha256 for name, obj in self.files.items()})

    def keys(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(self.uri, "no such tensor", tensor=name) from None

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name`, read with one positional read straight into its own memory (thread-safe: no shared
        file position, so read-ahead threads may call it concurrently)."""
        info = self.info(name)
        if self._torch_tensors is not None:
            return self._torch_tensors[name]
        return self._read(name, 0, info.shape[0] if info.shape else 1)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` (its first dimension), reading only their bytes."""
        if self._torch_tensors is not None:
            return self._torch_tensors[name][start:stop]
        return self._read(name, start, stop)

    @contextmanager
    def scratch(self, name: str, rows: tuple[int, int] | None = None) -> Iterator[torch.Tensor]:
        """`get(name)` (or its `rows`) read into this checkpoint's reusable buffer, valid inside the block only: for
        a caller that copies it at once (fresh memory for every read costs more in page faults than the read). A
        concurrent caller reads into memory of its own; the buffer kept is the largest one used."""
        if self._torch_tensors is not None:
            yield self.get(name) if rows is None else self.get_rows(name, *rows)
            return
        info = self.info(name)
        start, stop = rows or (0, info.shape[0] if info.shape else 1)
        nbytes = self._span(name, start, stop)[0]
        with self._lock:
            buffer, self._scratch = self._scratch, None
        if buffer is None or buffer.numel() < nbytes:
            buffer = torch.empty(nbytes, dtype=torch.uint8)
        try:
            yield self._read(name, start, stop, buffer)
        finally:
            with self._lock:
                if self._scratch is None or self._scratch.numel() < buffer.numel():
                    self._scratch = buffer

    def _span(self, name: str, start: int, stop: int) -> tuple[int, int]:
        """(bytes, file offset) of rows [start, stop) of tensor `name`."""
        info, loc = self.info(name), self._locations[name]
        row_bytes = (loc.end - loc.start) // max(info.shape[0], 1) if info.shape else loc.end - loc.start
        return row_bytes * (stop - start), loc.start + row_bytes * start

    def _read(self, name: str, start: int, stop: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) of tensor `name`, into `buffer` (bytes, large enough) when given."""
        info, loc = self.info(name), self._locations[name]
        shape = (stop - start, *info.shape[1:]) if info.shape else ()
        nbytes, offset = self._span(name, start, stop)
        out = torch.empty(nbytes, dtype=torch.uint8) if buffer is None else buffer[:nbytes]
        if nbytes:
            view, got = memoryview(out.numpy()), 0
            fd = self._descriptor(loc.file)
            while got < nbytes:  # a single read returns at most ~2 GiB
                step = os.preadv(fd, [view[got:]], offset + got)
                if step == 0:
                    raise CheckpointError(self.files[loc.file].uri, f"read {got} of {nbytes} bytes (truncated?)",
                                          name)
                got += step
        return out.view(info.dtype).reshape(shape)

    def _descriptor(self, file: str) -> int:
        with self._lock:
            fd = self._handles.get(file)
            if fd is None:
                fd = self._handles[file] = os.open(self.files[file].path, os.O_RDONLY)
            return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._handles.values():
                os.close(fd)
            self._handles.clear()
            self._scratch = None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse_safetensors(obj: LocalObject, infos: dict[str, TensorInfo], locations: dict[str, _Location],
                       file_key: str, only: set[str] | None = None) -> dict[str, str]:
    """Index one safetensors file into `infos`/`locations`, checking that every byte range lies in the file."""
    try:
        with open(obj.path, "rb") as f:
            data_start, header = decode_header(f.read(8), f.read)
    except ValueError as exc:
        raise CheckpointError(obj.uri, f"unreadable safetensors file: {exc}") from None
    metadata = header.pop("__metadata__", None) or {}
    for name, entry in header.items():
        if only is not None and name not in only:
            continue
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(obj.uri, f"malformed header entry {entry!r}", tensor=name) from None
        expected = element_size(dtype)
        for d in shape:
            expected *= d
        if end - start != expected or start < 0:
            raise CheckpointError(obj.uri, f"header gives {end - start} bytes for shape {shape} {dtype}", name)
        if data_start + end > obj.size:
            raise CheckpointError(
                obj.uri, f"truncated: tensor ends at byte {data_start + end} but the file has {obj.size}", name)
        if name in infos:
            raise CheckpointError(obj.uri, "tensor appears in more than one shard", tensor=name)
        infos[name] = TensorInfo(name, shape, dtype)
        locations[name] = _Location(file_key, data_start + start, data_start + end)
    return {str(k): str(v) for k, v in metadata.items()}


def _load_torch(obj: LocalObject) -> dict[str, torch.Tensor]:
    try:
        try:
            loaded = torch.load(obj.path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            loaded = torch.load(obj.path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            obj.uri,
            "holds pickled Python objects (for example a whole nn.Module), which Mergeflow never unpickles. "
            f"If you trust this file, convert it once: mergeflow convert {obj.uri} OUT.safetensors "
            f"(detail: {str(exc).splitlines()[0][:200]})",
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt archives
        raise CheckpointError(obj.uri, f"unreadable torch checkpoint (truncated or corrupt?): {exc}") from None
    if isinstance(loaded, Mapping) and "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise CheckpointError(obj.uri, f"expected a state dict (name -> tensor), found {type(loaded).__name__}")
    for name, value in loaded.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(obj.uri, f"entry is a {type(value).__name__}, not a tensor", tensor=str(name))
    return dict(loaded)


def _resolve(uri: str, storage_options: Mapping[str, Any] | None) -> tuple[str, str]:
    """(kind, uri of the file to open first); kind is 'safetensors', 'index' or 'torch'."""
    lowered = uri.lower()
    if lowered.endswith(".safetensors"):
        return "safetensors", uri
    if lowered.endswith(".index.json"):
        return "index", uri
    if lowered.endswith(TORCH_SUFFIXES):
        return "torch", uri
    fs, path = filesystem(uri, storage_options)
    try:
        found, is_dir = fs.exists(path), fs.isdir(path)
    except Exception as exc:  # noqa: BLE001 - classified into input vs transient errors
        raise storage_error(uri, exc, "opening the checkpoint") from exc
    if not found:
        raise CheckpointError(uri, "not found")
    if is_dir:
        for name, kind in ((SAFETENSORS_INDEX, "index"), ("model.safetensors", "safetensors"),
                           ("pytorch_model.bin", "torch")):
            if fs.exists(f"{path.rstrip('/')}/{name}"):
                return kind, join(uri, name)
        raise CheckpointError(uri, f"directory holds neither {SAFETENSORS_INDEX} nor model.safetensors")
    raise CheckpointError(uri, "unknown checkpoint format (expected .safetensors, .index.json, .pt or .bin)")


def open_checkpoint(uri: str, *, storage_options: Mapping[str, Any] | None = None,
                    cache: ContentCache | None = None) -> Checkpoint:
    """Open a checkpoint lazily; raises `CheckpointError` naming the file (and tensor) on any defect."""
    cache = cache or ContentCache()
    kind, first = _resolve(uri, storage_options)
    infos: dict[str, TensorInfo] = {}
    locations: dict[str, _Location] = {}
    if kind == "torch":
        obj = cache.fetch(first, storage_options)
        tensors = _load_torch(obj)
        infos = {k: TensorInfo(k, tuple(t.shape), t.dtype) for k, t in tensors.items()}
        return Checkpoint(uri, {Path(first).name: obj}, infos, {}, {}, torch_tensors=tensors)
    if kind == "safetensors":
        obj = cache.fetch(first, storage_options)
        name = first.rsplit("/", 1)[-1]
        metadata = _parse_safetensors(obj, infos, locations, name)
        return Checkpoint(uri, {name: obj}, infos, locations, metadata)
    index_obj = cache.fetch(first, storage_options)
    try:
        weight_map: dict[str, str] = json.loads(index_obj.path.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(first, f"invalid sharded index: {exc}") from None
    base = first.rsplit("/", 1)[0] if "/" in first else "."
    files: dict[str, LocalObject] = {first.rsplit("/", 1)[-1]: index_obj}
    metadata: dict[str, str] = {}
    by_shard: dict[str, set[str]] = {}
    for tensor, shard in weight_map.items():
        by_shard.setdefault(shard, set()).add(tensor)
    for shard, names in sorted(by_shard.items()):
        shard_uri = join(base, shard) if is_remote(base) or base != "." else shard
        files[shard] = cache.fetch(shard_uri, storage_options)
        metadata = _parse_safetensors(files[shard], infos, locations, shard, only=names) or metadata
        missing = names - infos.keys()
        if missing:
            raise CheckpointError(shard_uri, "index lists a tensor the shard does not hold",
                                  tensor=sorted(missing)[0])
    return Checkpoint(uri, files, infos, locations, metadata)
