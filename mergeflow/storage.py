"""Object storage through fsspec (local paths, file://, s3://), sha256 digests and atomic publication of output
directories (the local content cache of stored objects: `mergeflow.content_cache`).

A remote directory is published atomically for readers and once when runs race (`_publication`): its publisher's
marker `<dir>/.mergeflow-publishing-<owner>` is there while it uploads; `exists` and `fetch_directory` see no
directory with one (they wait while its publisher is alive), and the next publisher completes a cut one.

S3 endpoint and credentials come from `storage_options` (s3fs keywords: `endpoint_url`, `key`, `secret`, ...)
or, when absent, from the standard environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, `AWS_DEFAULT_REGION`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Protocol

import fsspec
from fsspec.callbacks import Callback
from fsspec.core import url_to_fs

from mergeflow import stopping
from mergeflow.staging import owned_dir
from mergeflow.errors import (MergeflowError, ObjectExistsError, ObjectNotFoundError, StorageAccessError,
                             TransientStorageError)

DOWNLOAD_BLOCK = 16 * 1024 * 1024
DOWNLOAD_PARALLEL = 8
PROGRESS_FROM = 64 * 1024 * 1024  # downloads at least this large show a progress bar
PUBLISHING = ".mergeflow-publishing-"  # in-progress marker of a remote directory: <dir>/<PUBLISHING><owner>
ABANDONED = "abandoned-"  # the owner part of a marker its publisher gave up (failed): never live
HEARTBEAT = 10.0  # seconds between refreshes of a live publisher's marker
STALE_AFTER = 60.0  # a marker not refreshed for this long belongs to a dead publisher
_active_markers: set[str] = set()  # this process's live markers (others with its owner prefix are dead ones)


class LocalCache(Protocol):
    """What this module needs of the content cache (`mergeflow.content_cache.ContentCache`): root and fetch."""

    root: Path

    def fetch(self, uri: str, storage_options: Mapping[str, Any] | None = None,
              expected_sha256: str | None = None) -> Any: ...


def default_cache_dir() -> Path:
    """The folder of the content cache and of remote outputs' staging: $MERGEFLOW_CACHE or ~/.cache/mergeflow."""
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
        options.setdefault("use_listings_cache", False)  # other processes write too: never answer from a stale listing
        if endpoint := options.pop("endpoint_url", None):
            options.setdefault("client_kwargs", {})["endpoint_url"] = endpoint
    elif not is_remote(uri):
        uri = str(local_path(uri).absolute())
    return url_to_fs(uri, **options)


def storage_error(uri: str, exc: BaseException, action: str) -> BaseException:
    """Map a filesystem/botocore failure to Mergeflow's errors: bad credentials, a missing bucket or a missing key
    are input errors (never retried); anything else (connection refused or reset, timeouts, 5xx) is transient.
    Messages never include credentials."""
    if isinstance(exc, (MergeflowError, stopping.Stopped)):  # ours, or a stop while waiting for a publisher
        return exc
    if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        return StorageAccessError(f"{uri}: no S3 credentials found while {action}; set AWS_ACCESS_KEY_ID / "
                                  "AWS_SECRET_ACCESS_KEY, a profile, or storage.credentials_block")
    if isinstance(exc, PermissionError):
        return StorageAccessError(f"{uri}: access denied while {action}; check the S3 credentials (AWS_ACCESS_KEY_ID /"
                                  " AWS_SECRET_ACCESS_KEY, a profile) and the endpoint")
    if isinstance(exc, FileNotFoundError):
        what = "the bucket does not exist" if "bucket" in str(exc).lower() else "no such object"
        return ObjectNotFoundError(f"{uri}: {what}")
    return TransientStorageError(f"{uri}: {action} failed: {type(exc).__name__}: {exc}")


def exists(uri: str, storage_options: Mapping[str, Any] | None = None, *, wait: bool = False) -> bool:
    """Whether `uri` is stored: a file, or a published directory (not one being published or cut short); with
    `wait`, a directory that a live publisher (a concurrent run) is publishing is waited for."""
    if not is_remote(uri):
        return local_path(uri).exists()
    fs, path = filesystem(uri, storage_options)
    try:
        if fs.info(path)["type"] != "directory":
            return True
        files, markers = _settled(fs, path) if wait else _listing(fs, path)
        return bool(files) and not markers
    except FileNotFoundError:
        return False
    except Exception as exc:  # noqa: BLE001 - classified into input vs transient errors
        raise storage_error(uri, exc, "checking for the object") from exc


def _hidden(name: str) -> bool:
    """Publication markers and upload temporaries: never part of a directory's content."""
    return name.startswith(PUBLISHING) or ".partial-" in name


def _listing(fs: fsspec.AbstractFileSystem, path: str) -> tuple[dict[str, str], dict[str, bool]]:
    """A remote directory's entries ({name: type}; markers and temporaries left out) and its publication markers
    ({name: live}: not given up, not left by a dead publisher of this process, refreshed within `STALE_AFTER`)."""
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}, {}
    files, markers = {}, {}
    for entry in entries:
        if entry["name"].endswith("/") or entry["name"].rstrip("/") == path.rstrip("/"):
            continue  # the directory itself (SeaweedFS lists one emptied of its objects as '<dir>/')
        name = entry["name"].rsplit("/", 1)[-1]
        if name.startswith(PUBLISHING):
            stamp = entry.get("LastModified") or entry.get("mtime") or entry.get("created") or time.time()
            age = time.time() - (stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp))
            owner = name[len(PUBLISHING):]
            markers[name] = age < STALE_AFTER and not owner.startswith(ABANDONED) and (
                name in _active_markers or not owner.startswith(f"{socket.gethostname()}-{os.getpid()}-"))
        elif not _hidden(name):
            files[name] = entry["type"]
    return files, markers


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
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
    content sha256 (also stored in the object's metadata, where the store keeps it, for later verification). A stop
    lands before the upload or as one of its parts lands (s3fs: 50 MiB; the multipart upload is aborted)."""
    sha, size, (fs, path) = sha256 or sha256_file(local), local.stat().st_size, filesystem(uri, storage_options)
    tmp, stop_check = f"{path}.partial-{uuid.uuid4().hex}", Callback(hooks={"stop": lambda *_: stopping.check()})
    try:
        if fs.exists(path):
            if _recorded_sha256(fs, path) == sha and fs.info(path)["size"] == size:
                return sha
            if not overwrite:
                raise ObjectExistsError(f"{uri} already exists with different content (not overwritten)")
        stopping.check()
        fs.put_file(str(local), tmp, Metadata={"sha256": sha}, callback=stop_check)
        if fs.info(tmp)["size"] != size or (hasattr(fs, "metadata") and _recorded_sha256(fs, tmp) != sha):
            raise TransientStorageError(f"{uri}: the uploaded temporary object does not verify; not published")
        fs.copy(tmp, path)
    except Exception as exc:  # noqa: BLE001 - classified into input vs transient errors
        raise storage_error(uri, exc, "uploading") from exc
    finally:
        with suppress(Exception):  # best effort: a leftover temporary key is never under the final name
            fs.rm(tmp)
    return sha


def staging_dir(final_uri: str, cache: LocalCache | None = None) -> Path:
    """A fresh directory to build an output in before `publish_directory` moves it to `final_uri`."""
    if not is_remote(final_uri):  # beside the output: a rename publishes it (a dead run's are removed: `staging`)
        final = local_path(final_uri).absolute()
        return owned_dir(final.parent, f".{final.name}.partial-")
    return owned_dir((cache.root if cache is not None else default_cache_dir()) / "staging", "out-")


def publish_directory(staged: Path, final_uri: str, storage_options: Mapping[str, Any] | None = None,
                      *, overwrite: bool = False, last: tuple[str, ...] = (),
                      digests: Mapping[str, str] | None = None) -> bool:
    """Publish a staged directory under `final_uri` all or nothing, once (the staged copy is removed). Local: one
    rename. Remote: under a publication marker (`_publication`), each file by `upload_file` (one stored with the same
    digest is kept: a cut publication resumes), `last` last. A published output is kept (False: a concurrent run was
    first) if it has every staged name (else FileExistsError); replaced only with `overwrite`. True: published.
    `digests`: sha256 of staged files already known (not hashed again). A stop lands between two upload parts."""
    names = sorted(p.name for p in staged.iterdir())
    try:
        if not is_remote(final_uri):
            return _publish_local(staged, final_uri, names, overwrite)
        fs, path = filesystem(final_uri, storage_options)
        if not overwrite and exists(final_uri, storage_options, wait=True):  # published before: no marker at all
            return _keep_existing(final_uri, names, set(_listing(fs, path)[0]))
        with _publication(fs, path.rstrip("/"), final_uri) as existing:
            for name in [n for n in names if n not in last] + [n for n in last if n in names]:
                if existing is None or overwrite:
                    upload_file(staged / name, join(final_uri, name), storage_options, overwrite=True,
                                sha256=(digests or {}).get(name))
        return True if existing is None or overwrite else _keep_existing(final_uri, names, existing)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _keep_existing(final_uri: str, names: list[str], existing: set[str]) -> bool:
    if missing := sorted(set(names) - existing):
        raise FileExistsError(f"{final_uri} already exists without {', '.join(missing)} (pass overwrite to replace it)")
    return False


def _settled(fs: fsspec.AbstractFileSystem, path: str, own: str = "") -> tuple[dict[str, str], dict[str, bool]]:
    """`_listing` of the directory once no live publisher (but `own`) holds it: waits for theirs to end."""
    while True:
        files, markers = _listing(fs, path)
        if not any(live for m, live in markers.items() if m != own):
            return files, markers
        stopping.check()
        time.sleep(random.uniform(0.1, 0.5))


def _publish_local(staged: Path, final_uri: str, names: list[str], overwrite: bool) -> bool:
    final = local_path(final_uri).absolute()
    if final.exists() and overwrite:
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex}")
        os.rename(final, old)
        os.rename(staged, final)
        shutil.rmtree(old, ignore_errors=True)
        return True
    try:
        if not final.exists():
            os.rename(staged, final)
            return True
    except OSError as exc:  # published meanwhile by a concurrent run (a rename onto a non-empty directory)
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not final.is_dir():
            raise
    return _keep_existing(final_uri, names, {p.name for p in final.iterdir()})


@contextmanager
def _publication(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> Iterator[set[str] | None]:
    """Hold the right to publish the remote directory `path` (waiting while another live publisher holds it);
    yields the names it holds when it was published before, None when it is absent or was cut short."""
    marker = f"{PUBLISHING}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    _active_markers.add(marker)
    try:
        while True:
            _settled(fs, path, marker)
            fs.pipe_file(f"{path}/{marker}", b"")
            files, markers = _listing(fs, path)
            if not any(live for m, live in markers.items() if m != marker):
                break  # alone: a publisher that writes its marker after this listing sees this one and withdraws
            fs.rm_file(f"{path}/{marker}")  # another one came in at once: both withdraw, the luckier goes first
            time.sleep(random.uniform(0.05, 0.5))
    except Exception as exc:  # noqa: BLE001 - classified into input vs transient errors
        _active_markers.discard(marker)
        raise storage_error(uri, exc, "claiming the publication") from exc
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(HEARTBEAT):
            with suppress(Exception):  # the upload itself reports a lost store
                fs.pipe_file(f"{path}/{marker}", b"")

    (beat := threading.Thread(target=heartbeat, daemon=True, name="mergeflow-publication")).start()
    cut_short, completed = [m for m in markers if m != marker], False
    try:
        yield None if cut_short or not files else set(files)
        completed = True
    finally:
        done.set()
        beat.join(timeout=30)
        _active_markers.discard(marker)
        if not completed:  # an abandoned marker instead of ours keeps the directory unpublished; none waits for it
            with suppress(Exception):  # best effort: with the store unreachable ours goes stale (at once here)
                fs.pipe_file(f"{path}/{PUBLISHING}{ABANDONED}{uuid.uuid4().hex[:12]}", b"")
                fs.rm_file(f"{path}/{marker}")
    try:  # complete: the markers and upload temporaries of the publications it finished, then its own (the commit)
        leftovers = [p.rsplit("/", 1)[-1] for p in fs.glob(f"{path}/*.partial-*")] if cut_short else []
        for name in [*cut_short, *leftovers, marker]:
            fs.rm_file(f"{path}/{name}")
    except Exception as exc:  # noqa: BLE001 - classified into input vs transient errors
        raise storage_error(uri, exc, "completing the publication") from exc


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
        entries, markers = _settled(fs, path)  # a publication under way is waited for
        if recursive:
            prefix = path.rstrip("/") + "/"
            names = [name[len(prefix):] for name in fs.find(path) if name.startswith(prefix)]
            names = [name for name in names if not any(_hidden(part) for part in name.split("/"))]
        else:
            names = [name for name, kind in entries.items() if kind == "file"]
    except Exception as exc:  # noqa: BLE001 - classified into input vs transient errors
        raise storage_error(uri, exc, "listing") from exc
    if markers:
        raise TransientStorageError(f"{uri}: not completely published (a publication was cut short: "
                                    f"{sorted(markers)[0]}); publish it again")
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
