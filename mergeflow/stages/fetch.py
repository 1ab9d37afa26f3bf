"""Fetch stages: the pretrained model (a built-in one is put in the store once), an expert checkpoint by URI, or
the newest checkpoint under a prefix."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mergeflow.checkpoints.adapter import ADAPTER_WEIGHTS
from mergeflow.config import ModelConfig
from mergeflow.errors import MergeflowError, ObjectNotFoundError
from mergeflow.families import get_family
from mergeflow.stages.refs import ModelRef, ObjectRef, builtin_model_uri
from mergeflow.stages.stage import Context, Located, Node, Stage
from mergeflow.stages.store import Store
from mergeflow.storage import directory_digest, filesystem, is_remote, storage_error


def materialize_pretrained(model: ModelConfig, store: Store) -> ModelRef:
    """Reference the pretrained model directory (checked against its family's layout); a built-in model is put
    in the store once."""
    family = get_family(model.family)
    if model.pretrained not in family.builtin_models:
        path, files = store.input_directory(model.pretrained, "model.pretrained")
        family.check_model_dir(path, f"model.pretrained ({model.pretrained})")
        return ModelRef(uri=model.pretrained, sha256=directory_digest(files), family=model.family)
    ref = store.publish_or_reuse(lambda staged: family.write_builtin_model(model.pretrained, staged),
                                 builtin_model_uri(store.root, model.pretrained))
    return ModelRef(uri=ref.uri, sha256=ref.sha256, family=model.family)


def fetch_checkpoint(uri: str, store: Store) -> ObjectRef:
    """Fetch (through the content cache) and open a checkpoint: validates its format, returns its digest."""
    return store.checkpoint_ref(uri)


def _modified(info: Mapping[str, Any]) -> float:
    value = info.get("LastModified", info.get("mtime", info.get("created", 0)))
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


def latest_checkpoint(prefix: str, store: Store) -> str:
    """URI of the newest `*.safetensors` checkpoint under `prefix` (statistics files and partial uploads aside), or
    of the LoRA adapter directory whose `adapter_model.safetensors` is the newest; ties go to the larger name.
    ObjectNotFoundError naming the prefix when there is none."""
    fs, path = filesystem(prefix, store.options)
    try:
        found = fs.find(path, detail=True) if fs.exists(path) else {}
    except Exception as exc:  # noqa: BLE001 - classified into input vs transient errors
        raise storage_error(prefix, exc, "listing") from exc
    candidates = {name: info for name, info in found.items()
                  if name.endswith(".safetensors") and not name.rsplit("/", 1)[-1].startswith(("statistics-", "."))
                  and ".partial" not in name}
    if not candidates:
        raise ObjectNotFoundError(f"{prefix}: no *.safetensors checkpoint under this prefix")
    newest = max(candidates, key=lambda name: (_modified(candidates[name]), name))
    if newest.rsplit("/", 1)[-1] == ADAPTER_WEIGHTS:  # an adapter: the expert is its directory
        newest = newest.rsplit("/", 1)[0]
    return f"{prefix.split('://', 1)[0]}://{newest}" if is_remote(prefix) else newest


# ---------------------------------------------------------------------------------------- the plan's stages

def _pretrained_where(node: Node, ctx: Context) -> Located:
    model = ctx.config.model
    uri = (builtin_model_uri(ctx.store.root, model.pretrained)
           if model.pretrained in get_family(model.family).builtin_models else model.pretrained)
    return uri, lambda: ModelRef(**ctx.store.directory_ref(uri).model_dump(), family=model.family)


def _expert_where(node: Node, ctx: Context) -> Located:
    uri = ctx.task_configs[node.task].expert
    return uri, lambda: ctx.store.checkpoint_ref(uri)


def _latest_where(node: Node, ctx: Context) -> Located:
    try:
        uri = latest_checkpoint(ctx.task_configs[node.task].latest, ctx.store)
    except MergeflowError:
        return None
    return uri, lambda: ctx.store.checkpoint_ref(uri)


def _fetch_pretrained(node: Node, ctx: Context) -> ModelRef:
    return materialize_pretrained(ctx.config.model, ctx.store)


def _fetch_expert(node: Node, ctx: Context) -> ObjectRef:
    return fetch_checkpoint(ctx.task_configs[node.task].expert, ctx.store)


def _fetch_latest(node: Node, ctx: Context) -> ObjectRef:
    return fetch_checkpoint(latest_checkpoint(ctx.task_configs[node.task].latest, ctx.store), ctx.store)


STAGES = (Stage("fetch_pretrained", _pretrained_where, _fetch_pretrained),
          Stage("fetch_expert", _expert_where, _fetch_expert),
          Stage("fetch_latest_expert", _latest_where, _fetch_latest))
