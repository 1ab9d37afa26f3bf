"""s3:// checkpoints through s3fs against a local S3 server (moto on 127.0.0.1): read, merge, publish, and the
content cache downloading an unchanged object once."""

from __future__ import annotations

import boto3
import pytest
import torch
from safetensors.torch import save_file

from mergeflow.checkpoints import open_checkpoint
from mergeflow.merge import merge_checkpoints, merge_state_dicts
from mergeflow.storage import filesystem, sha256_file


@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    bucket = f"models-{len(client.list_buckets()['Buckets'])}"
    client.create_bucket(Bucket=bucket)
    return {"endpoint_url": s3_server, "skip_instance_cache": True}, client, bucket


@pytest.mark.parametrize("method,params", [("ties", {}), ("doge_ta", {"steps": 10})])
def test_merge_reads_and_writes_s3(tmp_path, cache, model_files, s3, method, params):
    options, client, bucket = s3
    base_path, expert_paths, base, experts = model_files
    uris = []
    for path in [base_path, *expert_paths]:
        key = f"experts/{path.rsplit('/', 1)[-1]}"
        client.upload_file(path, bucket, key)
        uris.append(f"s3://{bucket}/{key}")
    result = merge_checkpoints(method, uris[0], uris[1:], f"s3://{bucket}/merged/{method}", shard_size=600,
                               storage_options=options, cache=cache, params=params)
    assert [i.sha256 for i in result.inputs] == [sha256_file(p) for p in [base_path, *expert_paths]]
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="merged/")["Contents"]}
    assert keys == {f"merged/{method}/{name}" for name in result.files} | {f"merged/{method}/mergeflow.json"}
    ckpt = open_checkpoint(f"s3://{bucket}/merged/{method}", storage_options=options, cache=cache)
    expected = merge_state_dicts(method, base, experts, params)
    assert all(torch.equal(ckpt.get(k), expected[k]) for k in expected)
    fs, _ = filesystem(f"s3://{bucket}", options)
    assert not [p for p in fs.ls(bucket) if "partial" in p]  # temporary upload prefix removed


def test_cache_downloads_an_unchanged_object_once(tmp_path, cache, s3, monkeypatch):
    options, client, bucket = s3
    save_file({"w": torch.ones(4)}, str(tmp_path / "a.safetensors"))
    client.upload_file(str(tmp_path / "a.safetensors"), bucket, "a.safetensors")
    uri = f"s3://{bucket}/a.safetensors"
    first = cache.fetch(uri, options)
    import mergeflow.content_cache

    opened = []
    real_download = mergeflow.content_cache._download
    monkeypatch.setattr(mergeflow.content_cache, "_download", lambda *a: opened.append(a[1]) or real_download(*a))
    second = cache.fetch(uri, options)
    assert second.path == first.path and second.sha256 == first.sha256 == sha256_file(tmp_path / "a.safetensors")
    assert opened == []  # served from the cache: no download
    save_file({"w": torch.zeros(4)}, str(tmp_path / "a.safetensors"))
    client.upload_file(str(tmp_path / "a.safetensors"), bucket, "a.safetensors")
    third = cache.fetch(uri, options)
    assert third.sha256 == sha256_file(tmp_path / "a.safetensors") != first.sha256
    assert opened  # changed object: downloaded again


def test_fetch_directory_recursive_on_s3_and_local(tmp_path, cache, s3):
    """An image-folder tree: only the top files without `recursive`, every file under its relative path with it,
    and the same digest for the same tree wherever it lies."""
    from mergeflow.storage import directory_digest, fetch_directory

    options, client, bucket = s3
    tree = {"classes.json": b"[]", "train/0/a.png": b"png-a", "train/1/b.png": b"png-b", "test/0/c.png": b"png-c"}
    local = tmp_path / "tree"
    for name, payload in tree.items():
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(payload)
        client.put_object(Bucket=bucket, Key=f"data/tree/{name}", Body=payload)
    uri = f"s3://{bucket}/data/tree"

    _, flat = fetch_directory(uri, cache, options)
    assert set(flat) == {"classes.json"}
    path, files = fetch_directory(uri, cache, options, recursive=True)
    assert set(files) == set(tree)
    assert all((path / name).read_bytes() == payload for name, payload in tree.items())
    local_path, local_files = fetch_directory(str(local), cache, recursive=True)
    assert local_path == local and directory_digest(local_files) == directory_digest(files)
    assert set(fetch_directory(str(local), cache)[1]) == {"classes.json"}


def test_a_stop_mid_upload_aborts_it_and_publishes_nothing(tmp_path, s3, monkeypatch):
    """Ctrl-C while a large file uploads (issue 32: 2.2 GB of merged model took 25 s to upload after the stop): the
    stop lands as the first multipart part lands, the multipart upload is aborted, the directory stays unpublished
    and holds no temporary key; once the stop is cleared the same staged files publish in full."""
    import s3fs

    from mergeflow import stopping
    from mergeflow.storage import exists, publish_directory

    options, client, bucket = s3
    options = {**options, "max_concurrency": 1}  # one part at a time: how many went up is then exact
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "model.safetensors").write_bytes(torch.randint(0, 255, (110 * 2**20,), dtype=torch.uint8).numpy())
    (staged / "manifest.json").write_text("{}")
    calls: list[str] = []
    real_call = s3fs.S3FileSystem._call_s3

    async def call_s3(self, method, *args, **kwargs):
        result = await real_call(self, method, *args, **kwargs)
        calls.append(method)
        if method == "upload_part" and "disarmed" not in calls:
            stopping.request_stop("test: Ctrl-C mid-upload")
        return result

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", call_s3)
    uri = f"s3://{bucket}/merged/stopped"
    try:
        with pytest.raises(stopping.Stopped):
            publish_directory(staged, uri, options, last=("manifest.json",))
    finally:
        stopping.reset()
    assert calls.count("upload_part") == 1 and "abort_multipart_upload" in calls  # 1 of 3 parts, then aborted
    assert "complete_multipart_upload" not in calls and not client.list_multipart_uploads(Bucket=bucket).get("Uploads")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="merged/").get("Contents", [])]
    assert not [k for k in keys if ".partial-" in k or k.endswith(("model.safetensors", "manifest.json"))], keys
    assert not exists(uri, options)

    calls.append("disarmed")
    staged.mkdir()
    (staged / "model.safetensors").write_bytes(b"\1" * (110 * 2**20))
    (staged / "manifest.json").write_text("{}")
    assert publish_directory(staged, uri, options, last=("manifest.json",)) and exists(uri, options)
