"""Object storage through fsspec (local paths, file://, s3://), sha256 digests and atomic publication of output
directories (the local content cache of stored objects: `mergeflow.content_cache`).

S3 endpoint and credentials come from `storage_options` (s3fs keywords: `endpoint_url`, `key`, `secret`, ...)
or, when absent, from the standard environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, `AWS_DEFAULT_REGION`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import fsspec
from fsspec.core import url_to_fs

from mergeflow.errors import (MergeflowError, ObjectExistsError, ObjectNotFoundError, StorageAccessError,
                             TransientStorageError)

CHUNK = 8 * 1024 * 1024
DOWNLOAD_BLOCK = 16 * 1024 * 1024
DOWNLOAD_PARALLEL = 8
PROGRESS_FROM = 64 * 1024 * 1024  # downloads at least this large show a progress bar


class LocalCache(Protocol):
    """What this module needs of the local content cache (`mergeflow.content_cache.ContentCache`, built on this
    module): its folder, and an object made available in it with its digest (`LocalObject`: path, sha256)."""

    root: Path

    def fetch(self, uri: str, storage_options: Mapping[str, Any] | None = None,
              expected_sha256: str | None = None) -> Any: ...


def default_cache_dir() -> Path:
    """The local folder of the content cache and of remote outputs' staging: $MERGEFLOW_CACHE, or
    ~/.cache/mergeflow."""
    return Path(os.environ.get("MERGEFLOW_CACHE", Path.home() / ".cache" / "mergeflow"))


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> Path:
    """Path of a local URI (plain path or file://)."""
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if "://" in uri:
        raise ValueError(f"{uri} is not a local path")
    return Path(uri)


def join(uri: str, *parts: str) -> str:
    """`uri` extended by relative key parts; a part that is absolute or climbs out with `..` is refused, so keys
    built from config values cannot escape their prefix."""
    for part in parts:
        if part.startswith("/") or "\\" in part or any(seg in {"..", "."} for seg in part.split("/")):
            raise ValueError(f"unsafe object key part {part!r} (absolute or with '..' segments)")
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def _s3_env_options() -> dict[str, Any]:
    """Endpoint and key pair from the standard AWS variables. The keys are passed explicitly because s3fs caches
    filesystem instances by their arguments: a client made before the variables changed is never reused."""
    options: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        options.update(key=key, secret=secret)
        if token := os.environ.get("AWS_SESSION_TOKEN"):
            options["token"] = token
    return options


def filesystem(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and in-filesystem path of a URI."""
    options = dict(storage_options or {})
    if uri.startswith("s3://"):
        options = {**_s3_env_options(), **options}
        endpoint = options.pop("endpoint_url", None)
        if endpoint:
            options.setdefault("client_kwargs", {})["endpoint_url"] = endpoint
    elif not is_remote(uri):
        uri = str(local_path(uri).absolute())
    return url_to_fs(uri, **options)


def storage_error(uri: str, exc: BaseException, action: str) -> BaseException:
    """Map a filesystem/botocore failure to Mergeflow's errors: bad credentials, a missing bucket or a missing key
    are input errors (never retried); anything else (connection refused or reset, timeouts, 5xx) is transient.
    Messages never include credentials."""
    if isinstance(exc, MergeflowError):
        return exc
    if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        return StorageAccessError(f"{uri}: no S3 credentials found while {action}; set AWS_ACCESS_KEY_ID / "
                                  "AWS_SECRET_ACCESS_KEY, a profile, or storage.credentials_block")
    if isinstance(exc, PermissionError):
        return StorageAccessError(f"{uri}: access denied while {action}; check the S3 credentials (AWS_ACCESS_KEY_ID /"
                                  " AWS_SECRET_ACCESS_KEY, a profile) and the endpoint")
    if isinstance(exc, FileNotFoundError):
        if "bucket" in str(exc).lower():
            return ObjectNotFoundError(f"{uri}: the bucket does not exist")
        return ObjectNotFoundError(f"{uri}: no such object")
    return TransientStorageError(f"{uri}: {action} failed: {type(exc).__name__}: {exc}")


def exists(uri: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    fs, path = filesystem(uri, storage_options)
    try:
        return fs.exists(path)
    except Exception as exc:  # noqa: BLE001 - classified into input vs transient errors
        raise storage_error(uri, exc, "checking for the object") from exc


def read_bytes(uri: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """The whole object at `uri` (a small file: a parquet split, a JSON description)."""
    fs, path = filesystem(uri, storage_options)
    try:
        with fs.open(path, "rb") as file:
            return file.read()
    except Exception as exc:  # noqa: BLE001 - classified into input vs transient errors
        raise storage_error(uri, exc, "reading") from exc


def write_files(uri: str, files: Mapping[str, bytes], storage_options: Mapping[str, Any] | None = None, *,
                what: str = "the files") -> None:
    """Write each `files[name]` to `uri/name` (a small dataset folder; the directory is created)."""
    fs, root = filesystem(uri, storage_options)
    root = root.rstrip("/")
    try:
        fs.makedirs(root, exist_ok=True)
        for name, payload in files.items():
            with fs.open(f"{root}/{name}", "wb") as file:
                file.write(payload)
    except Exception as exc:  # noqa: BLE001 - classified into input vs transient errors
        raise storage_error(uri, exc, f"writing {what}") from exc


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _recorded_sha256(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """The sha256 that Mergeflow stored in the object's metadata at upload, if the store keeps metadata."""
    if not hasattr(fs, "metadata"):
        return None
    return (fs.metadata(path) or {}).get("sha256")


def upload_file(local: Path, uri: str, storage_options: Mapping[str, Any] | None = None, *,
                overwrite: bool = False, sha256: str | None = None) -> str:
    """Upload one file atomically: to a temporary key, verified (its size, and its recorded digest on stores that
    keep object metadata, e.g. S3; the size alone on others, e.g. memory://), then copied to its final key. An
    identical object already there is left alone; a different one is an error unless `overwrite`. Returns the
    content sha256 (also stored in the object's metadata, where the store keeps it, for later verification)."""
    sha = sha256 or sha256_file(local)
    size = local.stat().st_size
    fs, path = filesystem(uri, storage_options)
    tmp = f"{path}.partial-{uuid.uuid4().hex}"
    try:
        if fs.exists(path):
            if _recorded_sha256(fs, path) == sha and fs.info(path)["size"] == size:
                return sha
            if not overwrite:
                raise ObjectExistsError(f"{uri} already exists with different content (not overwritten)")
        fs.put_file(str(local), tmp, Metadata={"sha256": sha})
        if fs.info(tmp)["size"] != size or (hasattr(fs, "metadata") and _recorded_sha256(fs, tmp) != sha):
            raise TransientStorageError(f"{uri}: the uploaded temporary object does not verify; not published")
        fs.copy(tmp, path)
    except Exception as exc:  # noqa: BLE001 - classified into input vs transient errors
        raise storage_error(uri, exc, "uploading") from exc
    finally:
        try:
            fs.rm(tmp)
        except Exception:  # noqa: BLE001 - best effort: a leftover temporary key is never under the final name
            pass
    return sha


def staging_dir(final_uri: str, cache: LocalCache | None = None) -> Path:
    """A fresh directory to build an output in before `publish_directory` moves it to `final_uri`."""
    if not is_remote(final_uri):
        final = local_path(final_uri).absolute()
        final.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    root = (cache.root if cache is not None else default_cache_dir()) / "staging"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="out-", dir=root))


def publish_directory(staged: Path, final_uri: str, storage_options: Mapping[str, Any] | None = None,
                      *, overwrite: bool = False, last: tuple[str, ...] = ()) -> None:
    """Publish a complete staged directory under `final_uri`, all or nothing.

    Local: one atomic rename. Remote: every file is uploaded with `upload_file` (temporary key, verified, then
    its final key), the names in `last` (the manifest) after all others, so a reader that finds the manifest finds
    a complete model. An existing different output is only replaced when `overwrite`; identical files are kept.
    """
    if not is_remote(final_uri):
        final = local_path(final_uri).absolute()
        if final.exists():
            if not overwrite:
                shutil.rmtree(staged, ignore_errors=True)
                raise FileExistsError(f"{final_uri} already exists (pass overwrite to replace it)")
            old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex}")
            os.rename(final, old)
            os.rename(staged, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staged, final)
        return
    names = sorted(p.name for p in staged.iterdir())
    names = [n for n in names if n not in last] + [n for n in last if n in names]
    try:
        for name in names:  # each file: temporary key, verify, final key; the manifest (`last`) goes last
            upload_file(staged / name, join(final_uri, name), storage_options, overwrite=overwrite)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def directory_digest(files: Mapping[str, str]) -> str:
    """One sha256 for a set of files: the digest of their sorted 'name sha256' lines."""
    lines = "".join(f"{name} {sha}\n" for name, sha in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def fetch_directory(uri: str, cache: LocalCache, storage_options: Mapping[str, Any] | None = None,
                    *, recursive: bool = False) -> tuple[Path, dict[str, str]]:
    """Make a stored directory available locally with its file names; returns (local dir, {name: sha256}).

    Only its own files, or with `recursive` every file below it under its relative path ('train/3/a.png': an
    image-folder tree). Remote files come through the content cache; the directory is a set of links into it,
    keyed by content.
    """
    if not is_remote(uri):
        root = local_path(uri).absolute()
        if not root.is_dir():
            raise FileNotFoundError(f"{uri}: directory not found")
        found = sorted(root.rglob("*") if recursive else root.iterdir())
        files = {p.relative_to(root).as_posix(): cache.fetch(str(p)).sha256 for p in found if p.is_file()}
        return root, files
    fs, path = filesystem(uri, storage_options)
    try:
        if recursive:
            prefix = path.rstrip("/") + "/"
            names = [name[len(prefix):] for name in fs.find(path) if name.startswith(prefix)]
        else:
            names = [e["name"].rsplit("/", 1)[-1] for e in fs.ls(path, detail=True) if e["type"] == "file"]
    except Exception as exc:  # noqa: BLE001 - classified into input vs transient errors
        raise storage_error(uri, exc, "listing") from exc
    objects = {name: cache.fetch(join(uri, name), storage_options) for name in sorted(names)}
    files = {name: obj.sha256 for name, obj in objects.items()}
    local = cache.root / "dirs" / directory_digest(files)
    if not local.is_dir():
        tmp = cache.root / "dirs" / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        for name, obj in objects.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(obj.path, tmp / name)
        try:
            os.rename(tmp, local)
        except OSError:  # another process built it first
            shutil.rmtree(tmp, ignore_errors=True)
    return local, files
