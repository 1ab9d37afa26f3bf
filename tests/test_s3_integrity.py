"""Object storage against a real S3 server (SeaweedFS): verified downloads, atomic uploads that never silently
overwrite, clear non-retried errors for bad credentials / missing bucket / missing key, and a flow that survives
the server going down in the middle of a multi-expert fetch."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import save_file

from mergeflow.checkpoints import open_checkpoint
from mergeflow.errors import IntegrityError, ObjectExistsError, ObjectNotFoundError, StorageAccessError
from mergeflow.merge import merge_checkpoints, merge_state_dicts
from mergeflow.storage import sha256_file, upload_file
from mergeflow.content_cache import ContentCache
from tasks import is_transient


def _upload_models(model_files, bucket):
    base_path, expert_paths, base, experts = model_files
    uris = [f"s3://{bucket}/models/{p.rsplit('/', 1)[-1]}" for p in [base_path, *expert_paths]]
    for path, uri in zip([base_path, *expert_paths], uris):
        upload_file(__import__("pathlib").Path(path), uri)
    return uris


def _keys(client, bucket, prefix=""):
    return {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])}


def test_merge_from_and_to_seaweedfs_with_recorded_digests(tmp_path, model_files, seaweed, s3_env):
    bucket = s3_env
    uris = _upload_models(model_files, bucket)
    cache = ContentCache(tmp_path / "cache")
    out = f"s3://{bucket}/merged/ties"
    result = merge_checkpoints("ties", uris[0], uris[1:], out, cache=cache, shard_size=700)
    client = seaweed.client()
    for name, digest in result.files.items():
        head = client.head_object(Bucket=bucket, Key=f"merged/ties/{name}")
        assert head["Metadata"]["sha256"] == digest
    assert not [k for k in _keys(client, bucket) if "partial" in k]
    _, _, base, experts = model_files
    expected = merge_state_dicts("ties", base, experts)
    ckpt = open_checkpoint(out, cache=ContentCache(tmp_path / "cache2"))
    assert all(torch.equal(ckpt.get(k), expected[k]) for k in expected)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_object_is_detected_and_nothing_is_merged(tmp_path, model_files, seaweed, s3_env, damage):
    bucket = s3_env
    uris = _upload_models(model_files, bucket)
    client = seaweed.client()
    key = uris[2].split(f"s3://{bucket}/", 1)[1]
    original = client.get_object(Bucket=bucket, Key=key)
    data, metadata = bytearray(original["Body"].read()), original["Metadata"]
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) - 100]
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data), Metadata=metadata)  # digest claims the original
    with pytest.raises(IntegrityError, match=key):
        merge_checkpoints("average", uris[0], uris[1:], f"s3://{bucket}/out", cache=ContentCache(tmp_path / "c"))
    assert _keys(client, bucket, "out") == set()


def test_expected_digest_from_a_reference_is_enforced(tmp_path, seaweed, s3_env):
    path = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(3)}, str(path))
    uri = f"s3://{s3_env}/a.safetensors"
    upload_file(path, uri)
    cache = ContentCache(tmp_path / "cache")
    assert cache.fetch(uri, expected_sha256=sha256_file(path)).sha256 == sha256_file(path)
    with pytest.raises(IntegrityError, match="a.safetensors"):
        cache.fetch(uri, expected_sha256="0" * 64)


def test_uploads_never_silently_overwrite_and_are_idempotent(tmp_path, seaweed, s3_env):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"first content")
    b.write_bytes(b"second content")
    uri = f"s3://{s3_env}/obj.bin"
    sha = upload_file(a, uri)
    assert upload_file(a, uri) == sha  # identical: left alone
    with pytest.raises(ObjectExistsError, match="obj.bin"):
        upload_file(b, uri)
    assert seaweed.client().get_object(Bucket=s3_env, Key="obj.bin")["Body"].read() == b"first content"
    upload_file(b, uri, overwrite=True)
    assert seaweed.client().get_object(Bucket=s3_env, Key="obj.bin")["Body"].read() == b"second content"


def test_crash_between_upload_and_publish_leaves_no_final_object(tmp_path, seaweed, s3_env, monkeypatch):
    from mergeflow.storage import filesystem

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash after the temporary upload")

    path = tmp_path / "a.bin"
    path.write_bytes(b"payload")
    fs, _ = filesystem(f"s3://{s3_env}/final.bin")  # the cached instance upload_file will use
    monkeypatch.setattr(fs, "copy", crash)
    with pytest.raises(Exception, match="simulated crash"):
        upload_file(path, f"s3://{s3_env}/final.bin")
    assert _keys(seaweed.client(), s3_env) == set()  # neither the final name nor the temporary key


def test_bad_credentials_missing_bucket_and_missing_key_are_clear_and_not_retried(tmp_path, seaweed, s3_env):
    cache = ContentCache(tmp_path / "cache")
    path = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(3)}, str(path))
    upload_file(path, f"s3://{s3_env}/a.safetensors")
    wrong = {"key": seaweed.access_key, "secret": "not-the-secret", "skip_instance_cache": True}
    cases = [
        (lambda: cache.fetch(f"s3://{s3_env}/a.safetensors", wrong), StorageAccessError, "access denied"),
        (lambda: cache.fetch("s3://no-such-bucket-here/a.safetensors"), ObjectNotFoundError, "bucket does not exist"),
        (lambda: cache.fetch(f"s3://{s3_env}/missing.safetensors"), ObjectNotFoundError, "no such object"),
        (lambda: open_checkpoint(f"s3://{s3_env}/missing.safetensors", cache=cache), Exception, "missing"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match) as info:
            call()
        assert not is_transient(info.value)
        assert "not-the-secret" not in str(info.value) and seaweed.secret_key not in str(info.value)


def test_flow_fetch_survives_the_server_stopping_midway(tmp_path, model_files, seaweed, s3_env, monkeypatch,
                                                        prefect_harness):
    from prefect import flow

    from mergeflow.config import StorageConfig
    from mergeflow.content_cache import ContentCache as Cache
    from tasks.fetch import fetch_expert

    uris = _upload_models(model_files, s3_env)
    storage = StorageConfig(root=f"s3://{s3_env}/store", cache_dir=str(tmp_path / "cache"), request_attempts=1)
    original = Cache._fetch_remote
    events = {"downloads": 0, "failures": 0}

    def fetch_and_sabotage(self, *args, **kwargs):
        try:
            obj = original(self, *args, **kwargs)
        except Exception:
            events["failures"] += 1
            raise
        events["downloads"] += 1
        if events["downloads"] == 1:  # the server goes away after the first expert, and comes back 3 s later
            seaweed.stop()
            threading.Timer(3.0, seaweed.start).start()
        return obj

    monkeypatch.setattr(Cache, "_fetch_remote", fetch_and_sabotage)

    @flow
    def fetch_all(uris: list[str]) -> list[str]:
        return [fetch_expert(f"e{i}", uri, storage).sha256 for i, uri in enumerate(uris)]

    digests = fetch_all(uris[1:])
    _, expert_paths, _, _ = model_files
    assert digests == [sha256_file(p) for p in expert_paths]
    assert events["failures"] >= 1  # the outage was real and the task retried through it
