"""The local, content-addressed cache of stored objects: each object fetched once (remote ones by concurrent
ranged reads, hashed on the way) and found again by its URI, size and version."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from mergeflow.errors import CheckpointError, IntegrityError
from mergeflow.progress import progress_bar
from mergeflow.storage import (DOWNLOAD_BLOCK, DOWNLOAD_PARALLEL, PROGRESS_FROM, _recorded_sha256, default_cache_dir,
                               filesystem, is_remote, local_path, sha256_file, storage_error)


@dataclass(frozen=True)
class LocalObject:
    """A stored object available as a local file, with its content digest."""

    uri: str
    path: Path
    sha256: str
    size: int


class ContentCache:
    """Local, content-addressed cache of stored objects, shared by the processes that use the same folder.

    Remote objects are downloaded once per (URI, ETag/size) and kept under `blobs/<sha256>`; local files are
    read in place and only their digest is remembered (keyed by path, size and mtime). Each remembered entry is a
    file of its own (`entries/<sha256 of the key>.json`), written whole and renamed into place, as blobs are: two
    processes filling the same entry write the same content, and no writer loses another's entry. (`index.json`,
    the single index of earlier versions, is still read.)
    """

    def __init__(self, root: Path | None = None):
        self.root = Path(root or default_cache_dir())
        self.blobs = self.root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.entries = self.root / "entries"
        self.entries.mkdir(exist_ok=True)
        self._legacy: dict[str, Any] | None = None

    def _entry(self, key: str) -> Path:
        return self.entries / f"{hashlib.sha256(key.encode()).hexdigest()}.json"

    def _known(self, key: str) -> dict[str, Any] | None:
        """The entry remembered for `key`, if any."""
        try:
            entry = json.loads(self._entry(key).read_text())
            return entry["value"] if entry.get("key") == key else None
        except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
            pass
        if self._legacy is None:
            try:
                self._legacy = json.loads((self.root / "index.json").read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                self._legacy = {}
        return self._legacy.get(key)

    def _remember(self, key: str, value: dict[str, Any]) -> None:
        path = self._entry(key)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps({"key": key, "value": value}, sort_keys=True))
        os.replace(tmp, path)

    def fetch(self, uri: str, storage_options: Mapping[str, Any] | None = None,
              expected_sha256: str | None = None) -> LocalObject:
        """Make `uri` available locally and return it with its sha256 (verified when `expected_sha256`)."""
        if is_remote(uri):
            obj = self._fetch_remote(uri, storage_options, expected_sha256)
        else:
            obj = self._fetch_local(uri)
        if expected_sha256 and obj.sha256 != expected_sha256:
            raise IntegrityError(f"{uri}: sha256 {obj.sha256} does not match the expected {expected_sha256}")
        return obj

    def _fetch_local(self, uri: str) -> LocalObject:
        path = local_path(uri).absolute()
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise CheckpointError(uri, "file not found") from None
        if not path.is_file():
            raise CheckpointError(uri, "not a regular file")
        key = f"local:{path}"
        known = self._known(key)
        if known and known["size"] == stat.st_size and known["mtime_ns"] == stat.st_mtime_ns:
            return LocalObject(uri, path, known["sha256"], stat.st_size)
        digest = sha256_file(path)
        self._remember(key, {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest})
        return LocalObject(uri, path, digest, stat.st_size)

    def _fetch_remote(self, uri: str, storage_options: Mapping[str, Any] | None,
                      expected_sha256: str | None) -> LocalObject:
        """Download once per (URI, ETag, size); verify size, and the digest recorded at upload or expected."""
        fs, path = filesystem(uri, storage_options)
        try:
            info = fs.info(path)
            recorded = _recorded_sha256(fs, path)
        except Exception as exc:  # noqa: BLE001 - classified into input vs transient errors
            raise storage_error(uri, exc, "reading object metadata") from exc
        size = int(info.get("size") or 0)
        version = str(info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or "")
        key = f"remote:{uri}"
        known = self._known(key)
        if known and known["size"] == size and known["version"] == version:
            blob = self.blobs / known["sha256"]
            if blob.is_file() and blob.stat().st_size == size:
                return LocalObject(uri, blob, known["sha256"], size)
        tmp = self.blobs / f".download-{uuid.uuid4().hex}"
        digest = hashlib.sha256()
        try:
            _download(fs, path, tmp, size, digest)
            got = tmp.stat().st_size
            if got != size:
                raise IntegrityError(f"{uri}: downloaded {got} bytes, the store reports {size} (truncated object?)")
            sha = digest.hexdigest()
            for claimed, source in ((recorded, "the digest recorded at upload"), (expected_sha256, "the expected digest")):
                if claimed and claimed != sha:
                    raise IntegrityError(f"{uri}: content sha256 {sha} does not match {source} {claimed}; "
                                         "the object is corrupt or was replaced")
            blob = self.blobs / sha
            os.replace(tmp, blob)
        except Exception as exc:  # noqa: BLE001 - classified into input vs transient errors
            raise storage_error(uri, exc, "downloading") from exc
        finally:
            tmp.unlink(missing_ok=True)
        self._remember(key, {"size": size, "version": version, "sha256": sha})
        return LocalObject(uri, blob, sha, size)


def _download(fs: fsspec.AbstractFileSystem, path: str, target: Path, size: int, digest: "hashlib._Hash") -> None:
    """Copy an object to `target`, hashing it on the way. Remote stores get concurrent ranged GETs (a window of
    `DOWNLOAD_PARALLEL` x `DOWNLOAD_BLOCK` bytes in flight, like S3 transfer managers); a window is hashed and
    written in order on a second thread while the next one downloads (sha256 and writes release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    ranges = [(start, min(start + DOWNLOAD_BLOCK, size)) for start in range(0, size, DOWNLOAD_BLOCK)]
    with open(target, "wb") as dst, progress_bar(total=size, unit="B", unit_scale=True, leave=False,
                                         desc=f"fetch {path.rsplit('/', 1)[-1]}", disable=size < PROGRESS_FROM) as bar, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergeflow-hash") as writer:

        def consume(blocks: list[bytes], window: list[tuple[int, int]]) -> None:
            for block, (start, end) in zip(blocks, window):
                if len(block) != end - start:
                    raise IntegrityError(f"{path}: got {len(block)} bytes for range {start}-{end} (object changed?)")
                digest.update(block)
                dst.write(block)
                bar.update(len(block))

        pending = None
        for first in range(0, len(ranges), DOWNLOAD_PARALLEL):
            window = ranges[first:first + DOWNLOAD_PARALLEL]
            blocks = fs.cat_ranges([path] * len(window), [a for a, _ in window], [b for _, b in window],
                                   on_error="raise")
            if pending is not None:
                pending.result()  # in order: the previous window is hashed and written before this one
            pending = writer.submit(consume, blocks, window)
        if pending is not None:
            pending.result()
