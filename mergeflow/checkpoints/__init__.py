"""Checkpoint I/O: lazy per-tensor readers, a streaming sharded safetensors writer, legacy conversion."""

from mergeflow.checkpoints.reader import Checkpoint, StateDictSource, TensorInfo, TensorSource, open_checkpoint
from mergeflow.checkpoints.writer import ShardedSafetensorsWriter, parse_size

__all__ = [
    "Checkpoint",
    "ShardedSafetensorsWriter",
    "StateDictSource",
    "TensorInfo",
    "TensorSource",
    "open_checkpoint",
    "parse_size",
]
