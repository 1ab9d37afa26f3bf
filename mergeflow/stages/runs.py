"""What a run leaves for the next one: the record of its last successful completion (read by `skip_unchanged`),
and local copies of stored models for the tracking server."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergeflow.stages.refs import ObjectRef, last_success_uri
from mergeflow.stages.store import Store
from mergeflow.storage import fetch_directory


def last_success(name: str, store: Store) -> dict[str, Any] | None:
    """The record of run `name`'s last successful completion (`runs/<name>/last-success.json`), if any."""
    uri = last_success_uri(store.root, name)
    return store.read_json(uri) if store.exists(uri) else None


def record_success(name: str, store: Store, record: Mapping[str, Any]) -> None:
    store.publish_json(last_success_uri(store.root, name), dict(record))


def local_directory_of(ref: ObjectRef, store: Store) -> Path:
    """A local copy of a stored directory (a merged model), for attaching it to a tracking run."""
    return fetch_directory(ref.uri, store.cache, store.options)[0]
