"""Fault (issue 34): SeaweedFS killed (SIGKILL) in the middle of publishing a large directory, then restarted on the
same data folder and ports. The publishing call fails with one clear line that the tasks retry, a reader sees no
directory (not a partial one), and publishing the same inputs again completes without uploading again what was
stored. Prints the times for the README's fault table."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

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
    from mergeflow.errors import TransientStorageError
    from stack_faults import publish_killed_midway, publish_row
    from tasks import is_transient

    uri = "s3://fault/store/merged/run/big-0123"
    options = {"config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"}, "connect_timeout": 2}}

    def kill() -> None:
        os.killpg(own_seaweed.process.pid, signal.SIGKILL)
        own_seaweed.process.wait()

    result = publish_killed_midway(tmp_path, uri, options, lambda: _keys(own_seaweed), kill,
                                   own_seaweed.start, SHARDS, SHARD_MB)  # restarted: the same data folder and ports
    assert "killed" in result["times"], "the publish ended before the store was killed"
    error = result["error"]
    assert isinstance(error, TransientStorageError) and is_transient(error), repr(error)
    assert "\n" not in str(error) and uri in str(error)
    stored, digests = result["stored"], result["digests"]
    assert 3 <= len(stored) < len(digests) and "mergeflow.json" not in stored  # cut short after some shards
    assert not result["visible_when_cut"]  # a reader sees no directory, not a partial one
    assert isinstance(result["read_error"], TransientStorageError) and "cut short" in str(result["read_error"])
    assert result["published"] is True
    assert set(result["uploaded"]) == set(digests) - stored  # resumed: what was stored is not uploaded again
    assert result["files"] == digests and not result["leftovers"]
    row = publish_row(result, SHARDS, SHARD_MB)
    assert row["ok"] and row["lost"] == "none", row
    with capsys.disabled():
        print(f"\nfault: {row['fault']}: {row['happens']}; recovered in {row['recover_s']:.1f} s; lost: {row['lost']}")
