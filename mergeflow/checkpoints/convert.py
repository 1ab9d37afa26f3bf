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
from mergeflow.storage import exists, is_remote, local_path, publish_directory, staging_dir
from mergeflow.content_cache import ContentCache


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


KINDS = ("state_dict", "open_clip_visual", "head")


def _select(tensors: dict[str, torch.Tensor], kind: str, source: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (and extra metadata) to write for `kind`:
    state_dict: everything; open_clip_visual: the visual tower of an open_clip model or of a task_vectors
    `ImageEncoder` (its `model.visual.` keys), under the tower's own names, which the open_clip family merges;
    head: a task_vectors `ClassificationHead` (a linear layer applied to normalised features) as a Mergeflow head
    (weight, bias, logit_scale 1)."""
    if kind == "state_dict":
        return tensors, {}
    if kind == "open_clip_visual":
        prefix = "model.visual." if any(k.startswith("model.visual.") for k in tensors) else "visual."
        visual = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not visual:
            raise CheckpointError(source, "no 'visual.' or 'model.visual.' tensors: not an open_clip image encoder")
        return visual, {}
    if kind == "head":
        if "weight" not in tensors or tensors["weight"].ndim != 2:
            raise CheckpointError(source, "no 2-D 'weight': not a classification head", tensor="weight")
        bias = tensors.get("bias", torch.zeros(tensors["weight"].shape[0]))
        return {"weight": tensors["weight"], "bias": bias}, {"logit_scale": repr(1.0)}
    raise ValueError(f"unknown conversion {kind!r}; known: {', '.join(KINDS)}")


def convert_legacy(source: str, destination: str, *, storage_options: Mapping[str, Any] | None = None,
                   cache: ContentCache | None = None, overwrite: bool = False, kind: str = "state_dict"
                   ) -> Path | str:
    """Load a trusted pickle once (weights_only=False) and write its state dict (or the part `kind` names, see
    `_select`) as a safetensors file."""
    if kind not in KINDS:
        raise ValueError(f"unknown conversion {kind!r}; known: {', '.join(KINDS)}")
    obj = (cache or ContentCache()).fetch(source, storage_options)
    if not destination.endswith(".safetensors"):
        raise ValueError(f"destination {destination} must end with .safetensors")
    loaded = torch.load(obj.path, map_location="cpu", weights_only=False)  # trusted: explicit convert step only
    tensors, extra = _select(_state_dict_of(loaded, source), kind, source)
    metadata = {"format": "pt", "converted_from": source, "source_sha256": obj.sha256, **extra}
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
