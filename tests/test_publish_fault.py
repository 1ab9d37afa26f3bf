"""Fault (issue 34): SeaweedFS killed (SIGKILL) in the middle of publishing a large directory, then restarted on the
same data folder and ports. The publishing call fails with one clear line that the tasks retry, a reader sees no
directory (not a partial one), and publishing the same inputs again completes without uploading again what was
stored. Prints the times for the README's fault table."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SHARDS, SHARD_MB = 8, 16  # 128 MiB in 8 files


@pytest.fixture
def own_seaweed(tmp_path, monkeypatch):
    """A SeaweedFS of this test's own (it is killed), stopped even when the test fails."""
    from s3_server import SeaweedServer

    (tmp_path / "weed").mkdir()
    server = SeaweedServer(tmp_path / "weed")
    server.start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    server.client().create_bucket(Bucket="fault")
    yield server
    server.stop()


def _keys(server) -> list[str]:
    return [o["Key"] for o in server.client().list_objects_v2(Bucket="fault").get("Contents", [])]


def test_store_killed_mid_publish_leaves_nothing_partial_and_a_rerun_resumes(tmp_path, own_seaweed, capsys):
    from mergeflow.content_cache import ContentCache
    from mergeflow.errors import TransientStorageError
    from mergeflow.storage import exists, fetch_directory, filesystem, publish_directory, sha256_file
    from tasks import is_transient

    source = tmp_path / "model"
    source.mkdir()
    for i in range(SHARDS):
        (source / f"model-{i:05d}-of-{SHARDS:05d}.safetensors").write_bytes(os.urandom(SHARD_MB * 2**20))
    (source / "mergeflow.json").write_text('{"files": "all of them"}')
    digests = {p.name: sha256_file(p) for p in source.iterdir()}
    uri = "s3://fault/store/merged/run/big-0123"
    options = {"config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"}, "connect_timeout": 2}}

    def staged() -> Path:  # the task builds the same inputs again for each attempt
        copy = tmp_path / f"staged-{time.monotonic_ns()}"
        shutil.copytree(source, copy, copy_function=os.link)
        return copy

    killed = {}

    def kill_after_three_shards() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if sum(k.endswith(".safetensors") and ".partial-" not in k for k in _keys(own_seaweed)) >= 3:
                os.killpg(own_seaweed.process.pid, signal.SIGKILL)
                own_seaweed.process.wait()
                killed["at"] = time.monotonic()
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_after_three_shards)
    watcher.start()
    with pytest.raises(TransientStorageError) as failure:
        publish_directory(staged(), uri, options, last=("mergeflow.json",))
    failed = time.monotonic()
    watcher.join()
    assert "at" in killed, "the publish ended before the store was killed"
    message = str(failure.value)
    assert "\n" not in message and "s3://fault/store/merged/run/big-0123" in message and is_transient(failure.value)

    own_seaweed.start()  # the same data folder and ports
    restarted = time.monotonic()
    keys = _keys(own_seaweed)
    stored = {k.rsplit("/", 1)[-1] for k in keys if ".partial-" not in k and "/.mergeflow-" not in k}
    assert 3 <= len(stored) < len(digests) and "mergeflow.json" not in stored  # cut short after some shards
    assert not exists(uri, options)  # a reader sees no directory, not a partial one
    with pytest.raises(TransientStorageError, match="cut short"):
        fetch_directory(uri, ContentCache(tmp_path / "reader"), options)

    fs, _ = filesystem(uri, options)
    uploaded = []
    put_file = fs.put_file
    fs.put_file = lambda local, remote, **kw: uploaded.append(Path(local).name) or put_file(local, remote, **kw)
    try:
        assert publish_directory(staged(), uri, options, last=("mergeflow.json",)) is True
    finally:
        del fs.put_file
    done = time.monotonic()
    assert set(uploaded) == set(digests) - stored  # resumed: what was stored is not uploaded again
    assert exists(uri, options)
    _, files = fetch_directory(uri, ContentCache(tmp_path / "reader"), options)
    assert files == digests
    assert not [k for k in _keys(own_seaweed) if ".partial-" in k or "/.mergeflow-" in k]
    with capsys.disabled():
        print(f"\nfault: SeaweedFS SIGKILL mid-publish ({SHARDS} x {SHARD_MB} MiB): the call failed "
              f"{failed - killed['at']:.1f} s after the kill with: {message[:160]}; "
              f"restart {restarted - failed:.1f} s; "
              f"rerun {done - restarted:.1f} s, uploading {len(uploaded)} of {len(digests)} files "
              f"({len(stored)} kept); kill to published {done - killed['at']:.1f} s; data lost: none")
