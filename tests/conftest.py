"""Shared fixtures: tiny random models written as real checkpoint files, and an isolated content cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from factories import make_experts, tiny_state_dict
from mergeflow.content_cache import ContentCache


@pytest.fixture
def cache(tmp_path: Path) -> ContentCache:
    return ContentCache(tmp_path / "cache")


@pytest.fixture
def model_files(tmp_path: Path):
    """(base path, [expert paths], base state dict, expert state dicts) as single-file safetensors."""
    base = tiny_state_dict()
    experts = make_experts(base, 3)
    root = tmp_path / "models"
    root.mkdir()
    save_file(base, str(root / "base.safetensors"))
    paths = []
    for i, sd in enumerate(experts):
        path = root / f"expert{i}.safetensors"
        save_file(sd, str(path))
        paths.append(str(path))
    return str(root / "base.safetensors"), paths, base, experts


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One temporary Prefect server (SQLite under a temp PREFECT_HOME) for every test that runs flows."""
    import os

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


class SeaweedHolder:
    """The session's SeaweedFS, started on first use."""

    def __init__(self, directory: Path) -> None:
        from s3_server import SeaweedServer

        self.server = SeaweedServer(directory)
        self.running = False

    def ensure(self):
        if not self.running:
            self.server.start()
            self.running = True
        return self.server

    def stop(self) -> None:
        if self.running:
            self.server.stop()
            self.running = False


@pytest.fixture(scope="session")
def seaweed_holder(tmp_path_factory):
    holder = SeaweedHolder(tmp_path_factory.mktemp("seaweed"))
    yield holder
    holder.stop()


@pytest.fixture
def seaweed(seaweed_holder):
    """A real S3 server (SeaweedFS), one per session; tests get credentials through the environment."""
    return seaweed_holder.ensure()


@pytest.fixture
def s3_env(seaweed, monkeypatch):
    """Credentials and endpoint in the standard AWS variables, as a user would set them; a fresh bucket."""
    import uuid

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", seaweed.endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    seaweed.client().create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture(scope="module")
def single_threaded():
    """Ops on tiny models gain nothing from a second thread and slow down many times over when the shared cores
    are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def isolated_and_single_threaded(single_threaded, tmp_path_factory: pytest.TempPathFactory):
    """Also keep the content cache (checkpoint reads remember digests there) out of the home folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MERGEFLOW_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture
def split_reads(monkeypatch) -> list[tuple[str, str]]:
    """Every (task run name, split) a task's data is read for during the test ("flow" outside a task), by every
    family's split reader: text, CLIP (parquet files and image folders) and seq2seq."""
    import mergeflow.families.clip.data as clip_data
    import mergeflow.families.seq2seq.data as seq2seq_data
    import mergeflow.families.text.data as text_tasks
    from prefect.context import TaskRunContext

    reads: list[tuple[str, str]] = []

    def spy(module, name: str, split_of) -> None:
        original = getattr(module, name)

        def recording(*args, **kwargs):
            context = TaskRunContext.get()
            reads.append((context.task_run.name if context else "flow", split_of(*args)))
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, recording)

    def parquet_split(source: str, *_) -> str:  # <dataset>/<split>.parquet
        return source.rstrip("/").rsplit("/", 1)[-1].removesuffix(".parquet")

    spy(text_tasks, "read_split", lambda directory, split: split)
    spy(clip_data, "_read_split", parquet_split)
    spy(clip_data, "_read_folder_split", lambda fs, root, uri, split, *_: split)
    spy(seq2seq_data, "_read_split", parquet_split)
    return reads


@pytest.fixture
def store_and_refs(tmp_path):
    """A Store in tmp_path, the reference of a tiny base model directory and of three experts near it."""
    from safetensors.torch import save_file

    from factories import make_experts, tiny_state_dict
    from mergeflow.content_cache import ContentCache
    from mergeflow.stages.refs import ObjectRef
    from mergeflow.stages.store import Store

    base = tiny_state_dict()
    experts = make_experts(base, 3)
    model_dir = tmp_path / "models" / "base"
    model_dir.mkdir(parents=True)
    save_file(base, str(model_dir / "model.safetensors"))
    (model_dir / "config.json").write_text("{}")
    store = Store(str(tmp_path / "store"), {}, ContentCache(tmp_path / "cache"))
    from mergeflow.storage import directory_digest, fetch_directory

    _, files = fetch_directory(str(model_dir), store.cache)
    base_ref = ObjectRef(uri=str(model_dir), sha256=directory_digest(files))
    refs = {}
    for i, sd in enumerate(experts):
        path = tmp_path / "models" / f"e{i}.safetensors"
        save_file(sd, str(path))
        refs[f"e{i}"] = store.checkpoint_ref(str(path))
    return store, base_ref, refs
