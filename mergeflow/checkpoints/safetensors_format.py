"""The safetensors file layout: an 8-byte little-endian header length, a JSON header, then raw tensor bytes.

Reading the header ourselves lets us read one tensor at a time with plain `seek`/`readinto` (no mmap, so
resident memory stays bounded by the tensor being processed) and write a shard's header before its data.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def encode_header(entries: dict[str, dict[str, Any]], metadata: dict[str, str] | None) -> bytes:
    """Header bytes (length prefix included), padded with spaces to a multiple of 8 as safetensors does."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    header.update(entries)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def decode_header(prefix: bytes, read_more) -> tuple[int, dict[str, Any]]:
    """Parse a header given its first 8 bytes and a `read_more(n)` callable; returns (data start, header)."""
    if len(prefix) < 8:
        raise ValueError("file is shorter than the 8-byte safetensors header length")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER:
        raise ValueError(f"header length {length} is implausible (not a safetensors file?)")
    raw = read_more(length)
    if len(raw) < length:
        raise ValueError("file ends inside the safetensors header (truncated)")
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return 8 + length, header


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file whose bytes depend only on its content: tensors in name order, metadata keys
    sorted. (`safetensors.torch.save_file` orders metadata by a per-process hash, so the same content gets a
    different digest in another process, which would defeat content-addressed caching.)"""
    names = sorted(tensors)
    entries: dict[str, dict[str, Any]] = {}
    offset = 0
    for name in names:
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        entries[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                         "data_offsets": [offset, offset + size]}
        offset += size
    with open(path, "wb") as file:
        file.write(encode_header(entries, dict(sorted(metadata.items())) if metadata else None))
        for name in names:
            file.write(tensors[name].detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
