"""The store a stage works in, built once per task: root, storage options (credentials included) and the
local content cache, with the few operations every stage needs (exists, references of stored objects, JSON
records, atomic publishing) and the readers of stored inputs (task data, heads, models) verified by digest."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergeflow.checkpoints.adapter import adapter_digest, is_adapter, open_adapter
from mergeflow.config import StorageConfig
from mergeflow.errors import CheckpointError, ConfigError, IntegrityError, ObjectNotFoundError
from mergeflow.families import LoadedModel, TaskData
from mergeflow.stages.refs import ObjectRef, base_weights, family_of
from mergeflow.storage import (directory_digest, exists, fetch_directory, filesystem, is_remote, join, local_path,
                               publish_directory, staging_dir, upload_file)
from mergeflow.content_cache import ContentCache

if TYPE_CHECKING:
    from mergeflow.subspace import SubspaceReader
    from mergeflow.task_vectors import ExpertPool


@dataclass(frozen=True)
class Store:
    root: str
    options: dict[str, Any]
    cache: ContentCache

    @classmethod
    def of(cls, storage: StorageConfig, credentials: Mapping[str, str] | None = None) -> Store:
        """The store of `storage`, with the S3 key pair of its `credentials_block` when it names one (s3fs
        keywords: key, secret[, token]; the orchestration layer loads them)."""
        return cls(storage.root, storage.options(credentials),
                   ContentCache(Path(storage.cache_dir) if storage.cache_dir else None))

    def exists(self, uri: str) -> bool:
        """Whether `uri` is stored: a file or a published directory. One a concurrent run is publishing now is
        waited for, so that this run reuses it instead of computing it again."""
        return exists(uri, self.options, wait=True)

    def fetch(self, uri: str, expected_sha256: str | None = None):
        return self.cache.fetch(uri, self.options, expected_sha256=expected_sha256)

    def file_ref(self, uri: str) -> ObjectRef:
        """The reference of a stored file (fetched through the cache for its digest)."""
        return ObjectRef(uri=uri, sha256=self.fetch(uri).sha256)

    def read_json(self, uri: str) -> Any:
        return json.loads(self.fetch(uri).path.read_text())

    def remove(self, uri: str) -> None:
        fs, path = filesystem(uri, self.options)
        fs.rm(path, recursive=True)

    def local_directory(self, ref: ObjectRef) -> Path:
        """A local copy of a stored directory, verified against the reference's digest."""
        path, files = fetch_directory(ref.uri, self.cache, self.options)
        if directory_digest(files) != ref.sha256:
            raise IntegrityError(f"{ref.uri}: content digest {directory_digest(files)} != expected {ref.sha256}")
        return path

    def subspace(self, ref: ObjectRef, experts: Sequence[str] | None = None) -> SubspaceReader:
        """A stored subspace (`mergeflow.subspace`): its index fetched and verified against the reference's digest
        now, each factor file fetched and verified against the index when a layer in it is first read."""
        from mergeflow.subspace import INDEX, SubspaceReader

        index = json.loads(self.fetch(join(ref.uri, INDEX), expected_sha256=ref.sha256).path.read_text())
        return SubspaceReader.stored(
            index, ref.uri, lambda name, sha256: self.fetch(join(ref.uri, name), expected_sha256=sha256).path, experts)

    def base_checkpoint(self, base: ObjectRef) -> tuple[str, str]:
        """(URI, digest) of the base directory's weights as `open_checkpoint` reads them, from its files (verified
        against the base's reference): `model.safetensors` and its sha256, or for a sharded base (no
        model.safetensors) `model.safetensors.index.json` and the digest of the index and the shards it lists."""
        from mergeflow.checkpoints.reader import SAFETENSORS_INDEX, files_digest

        path, files = fetch_directory(base.uri, self.cache, self.options)
        if directory_digest(files) != base.sha256:
            raise IntegrityError(f"{base.uri}: content digest {directory_digest(files)} != expected {base.sha256}")
        if "model.safetensors" in files:
            return base_weights(base), files["model.safetensors"]
        if SAFETENSORS_INDEX not in files:
            raise CheckpointError(base.uri, f"the base directory holds neither model.safetensors nor "
                                            f"{SAFETENSORS_INDEX}")
        try:
            shards = set(json.loads((path / SAFETENSORS_INDEX).read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(join(base.uri, SAFETENSORS_INDEX), f"invalid sharded index: {exc}") from None
        missing = sorted(shards - files.keys())
        if missing:
            raise CheckpointError(join(base.uri, missing[0]), "a shard the index lists is not in the directory")
        return (base_weights(base, SAFETENSORS_INDEX),
                files_digest({SAFETENSORS_INDEX: files[SAFETENSORS_INDEX], **{name: files[name] for name in shards}}))

    def base_weights(self, base: ObjectRef) -> str:
        """The URI a merge opens the base's weights by (`base_checkpoint`)."""
        return self.base_checkpoint(base)[0]

    def input_digests(self, base: ObjectRef, experts: Mapping[str, ObjectRef],
                      statistics: Mapping[str, ObjectRef] | None = None) -> list[str]:
        """The content digests a merge of `experts` over `base` must find where it reads them: the base's weights
        (`base_checkpoint`: from its directory, verified against the base's reference), each expert's (a LoRA
        adapter's: `adapter_digest`), then each expert's statistics' when given."""
        return [self.base_checkpoint(base)[1], *(ref.sha256 for ref in experts.values()),
                *(statistics[name].sha256 for name in experts if statistics)]

    def local_file(self, ref: ObjectRef) -> Path:
        return self.fetch(ref.uri, expected_sha256=ref.sha256).path

    def input_directory(self, uri: str, field: str, recursive: bool = False) -> tuple[Path, dict[str, str]]:
        """A user's directory named by config `field`: ConfigError naming both when it is missing or empty."""
        try:
            path, files = fetch_directory(uri, self.cache, self.options, recursive=recursive)
        except (FileNotFoundError, ObjectNotFoundError):
            raise ConfigError(f"{field}: directory {uri} not found") from None
        if not files:
            raise ConfigError(f"{field}: directory {uri} is empty or missing")
        return path, files

    def publish_or_reuse(self, build: Callable[[Path], None], final_uri: str, digest_of: str | None = None
                         ) -> ObjectRef:
        """The stored directory at `final_uri`, built in a staging directory and published atomically first if
        it is not there (published once: when a concurrent run publishes it first, this copy is dropped and that one
        is used). Its digest is that of all its files, or with `digest_of` that of this one file (an index that
        records the others' digests, so a reader fetches only what it reads)."""
        if not self.exists(final_uri):
            staged = staging_dir(final_uri, self.cache)
            try:
                build(staged)
                publish_directory(staged, final_uri, self.options)
            finally:
                shutil.rmtree(staged, ignore_errors=True)
        if digest_of is not None:
            return ObjectRef(uri=final_uri, sha256=self.fetch(join(final_uri, digest_of)).sha256)
        _, files = fetch_directory(final_uri, self.cache, self.options)
        return ObjectRef(uri=final_uri, sha256=directory_digest(files))

    def publish_file(self, uri: str, write: Callable[[Path], None]) -> None:
        """Write one file through a staging directory and publish it atomically under its final name (replacing
        one there: the last of concurrent writers wins, whole)."""
        parent, name = uri.rsplit("/", 1)
        staged = staging_dir(uri, self.cache)
        try:
            write(staged / name)
            if is_remote(uri):
                upload_file(staged / name, uri, self.options, overwrite=True)
            else:
                local_path(parent).mkdir(parents=True, exist_ok=True)
                (staged / name).replace(local_path(uri))
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def publish_json(self, uri: str, record: Any) -> None:
        self.publish_file(uri, lambda path: path.write_text(json.dumps(record, indent=2)))

    # ----------------------------------------------------------------------------------- stored inputs, read

    def read_task(self, task: str, dataset: ObjectRef, base: ObjectRef, splits: Sequence[str] | None = None
                  ) -> TaskData:
        """Task `task`'s stored data (only `splits`), read by the base model's family."""
        path = self.local_directory_recursive(dataset)
        try:
            return family_of(base).read_dataset(path, task, splits)
        except ConfigError as exc:
            raise ConfigError(f"{dataset.uri}: {exc}") from None

    def local_directory_recursive(self, ref: ObjectRef) -> Path:
        path, files = fetch_directory(ref.uri, self.cache, self.options, recursive=True)
        if directory_digest(files) != ref.sha256:
            raise IntegrityError(f"{ref.uri}: content digest {directory_digest(files)} != expected {ref.sha256}")
        return path

    def load_head(self, head: ObjectRef, base: ObjectRef) -> Any:
        return family_of(base).load_head(self.local_file(head), head.uri)

    def load_model(self, base: ObjectRef, weights: ObjectRef | None, device: str,
                   state_dict: Mapping[str, Any] | None = None) -> LoadedModel:
        """The base model's family model with `weights` (a stored checkpoint, verified), an in-memory
        `state_dict`, or the pretrained weights."""
        from mergeflow.checkpoints import open_checkpoint
        from mergeflow.task_vectors import resolve_device

        model_dir = self.local_directory(base)
        if weights is not None and is_adapter(weights.uri, self.options):  # W0 + scale * B @ A, tensor by tensor
            with open_checkpoint(self.base_weights(base), storage_options=self.options, cache=self.cache) as ckpt, \
                    open_adapter(weights.uri, ckpt, storage_options=self.options, cache=self.cache) as adapter:
                if adapter.digest != weights.sha256:
                    raise IntegrityError(f"{weights.uri}: digest {adapter.digest} != expected {weights.sha256}")
                state_dict = {k: adapter.get(k) for k in adapter.keys()}
        elif weights is not None:
            with open_checkpoint(weights.uri, storage_options=self.options, cache=self.cache) as ckpt:
                if ckpt.digest != weights.sha256:
                    raise IntegrityError(f"{weights.uri}: digest {ckpt.digest} != expected {weights.sha256}")
                state_dict = {k: ckpt.get(k) for k in ckpt.keys()}
        return family_of(base).load(model_dir, state_dict, resolve_device(device))

    def directory_ref(self, uri: str, recursive: bool = False) -> ObjectRef:
        """A stored directory's reference (its files' digests from the content cache)."""
        _, files = fetch_directory(uri, self.cache, self.options, recursive=recursive)
        return ObjectRef(uri=uri, sha256=directory_digest(files))

    def checkpoint_ref(self, uri: str) -> ObjectRef:
        """Fetch (through the cache) and open a checkpoint, or a LoRA adapter directory (its config and weights;
        matched to a base where it is read): validates its format, returns its reference."""
        from mergeflow.checkpoints import open_checkpoint

        if is_adapter(uri, self.options):
            return ObjectRef(uri=uri, sha256=adapter_digest(uri, storage_options=self.options, cache=self.cache))
        with open_checkpoint(uri, storage_options=self.options, cache=self.cache) as ckpt:
            return ObjectRef(uri=uri, sha256=ckpt.digest)

    @contextmanager
    def expert_pool(self, base: ObjectRef, experts: Mapping[str, ObjectRef], device: str,
                    subspaces: Mapping[str, ObjectRef] | None = None,
                    statistics: Mapping[str, ObjectRef] | None = None) -> Iterator[ExpertPool]:
        """The base and experts' checkpoints opened (lazily, tensor by tensor) as one pool, each checked against
        its reference's digest, with the stored `subspaces` (kind -> reference, verified) and the experts'
        `statistics` (name -> reference, verified) it may read; closed on exit."""
        from mergeflow.subspace import expert_identities
        from mergeflow.task_vectors import open_pool

        expected = self.input_digests(base, experts, statistics)
        base_uri = self.base_weights(base)
        stats = None if statistics is None else [statistics[name].uri for name in experts]
        with open_pool(base_uri, {name: ref.uri for name, ref in experts.items()}, device,
                       storage_options=self.options, cache=self.cache, statistics=stats) as pool:
            uris = [base_uri, *(r.uri for r in experts.values()), *(stats or ())]
            for uri, source, digest in zip(uris, [pool.base, *pool.experts, *(pool.statistics or ())], expected,
                                           strict=True):
                if source.digest != digest:
                    raise IntegrityError(f"{uri}: content digest {source.digest} != expected {digest}")
            pool.subspaces = {kind: self.subspace(ref, expert_identities(pool))
                              for kind, ref in (subspaces or {}).items()}
            yield pool
