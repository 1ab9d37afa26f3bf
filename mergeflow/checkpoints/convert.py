"""`mergeflow convert`: turn a trusted legacy pickle (a whole nn.Module, as the public task_vectors CLIP
checkpoints are, or a pickled dict) into safetensors, once. This is the only place Mergeflow unpickles
arbitrary objects, and only on the user's explicit request."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from mergeflow.checkpoints.safetensors_format import save_safetensors

from mergeflow.errors import CheckpointError
from mergeflow.storage import ContentCache, exists, is_remote, local_path, publish_directory, staging_dir


def _state_dict_of(obj: Any, source: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(source, f"holds a {type(obj).__name__}, neither a module nor a state dict")
    tensors = {}
    for name, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(source, f"entry is a {type(value).__name__}, not a tensor", tensor=str(name))
        tensors[str(name)] = value.detach().cpu().contiguous().clone()  # clone: safetensors refuses shared storage
    return tensors


def convert_legacy(source: str, destination: str, *, storage_options: Mapping[str, Any] | None = None,
                   cache: ContentCache | None = None, overwrite: bool = False) -> Path | str:
    """Load a trusted pickle once (weights_only=False) and write its state dict as a safetensors file."""
    obj = (cache or ContentCache()).fetch(source, storage_options)
    if not destination.endswith(".safetensors"):
        raise ValueError(f"destination {destination} must end with .safetensors")
    loaded = torch.load(obj.path, map_location="cpu", weights_only=False)  # trusted: explicit convert step only
    tensors = _state_dict_of(loaded, source)
    metadata = {"format": "pt", "converted_from": source, "source_sha256": obj.sha256}
    if not is_remote(destination):
        target = local_path(destination)
        if target.exists() and not overwrite:
            raise FileExistsError(f"{destination} already exists")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.partial")
        save_safetensors(tensors, tmp, metadata)
        tmp.replace(target)
        return target
    if exists(destination, storage_options) and not overwrite:
        raise FileExistsError(f"{destination} already exists")
    parent, name = destination.rsplit("/", 1)
    staged = staging_dir(destination, cache)
    save_safetensors(tensors, staged / name, metadata)
    publish_directory(staged, parent, storage_options, overwrite=True)
    return destination
