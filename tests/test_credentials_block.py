"""S3 credentials from a Prefect block against the real SeaweedFS server: with no AWS variables or profile in the
environment, tasks read and write through the block's key pair, and the secret shows up in no parameter or log."""

from __future__ import annotations

import uuid

import pytest
from safetensors.torch import save_file

from factories import tiny_state_dict
from mergeflow.config import StorageConfig
from mergeflow.errors import ConfigError

pytestmark = pytest.mark.slow


def test_unloaded_block_is_a_clear_error():
    with pytest.raises(ConfigError, match="storage.credentials_block: the key pair of block 'nowhere' was not given"):
        StorageConfig(root="s3://b/p", credentials_block="nowhere").options()
    with_pair = StorageConfig(root="s3://b/p", credentials_block="nowhere").options({"key": "k", "secret": "s"})
    assert with_pair["key"] == "k" and with_pair["secret"] == "s"


def test_tasks_use_the_block_and_never_show_its_secret(tmp_path, seaweed, prefect_harness, monkeypatch, capfd):
    import anyio
    from prefect import flow
    from prefect.client.orchestration import get_client

    from tasks.credentials import S3Credentials
    from tasks.fetch import fetch_expert

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    bucket = f"blk-{uuid.uuid4().hex[:10]}"
    seaweed.client().create_bucket(Bucket=bucket)
    save_file(tiny_state_dict(), str(tmp_path / "expert.safetensors"))
    seaweed.client().upload_file(str(tmp_path / "expert.safetensors"), bucket, "experts/e.safetensors")
    block_name = f"s3-{uuid.uuid4().hex[:8]}"
    S3Credentials(aws_access_key_id=seaweed.access_key, aws_secret_access_key=seaweed.secret_key).save(block_name)

    @flow
    def fetch_one(storage: StorageConfig):
        return fetch_expert("e", f"s3://{bucket}/experts/e.safetensors", storage)

    common = {"root": f"s3://{bucket}/store", "endpoint_url": seaweed.endpoint, "cache_dir": str(tmp_path / "c")}
    ref = fetch_one(StorageConfig(**common, credentials_block=block_name))
    from mergeflow.storage import sha256_file

    assert ref.sha256 == sha256_file(tmp_path / "expert.safetensors")

    from mergeflow.errors import StorageAccessError

    # no block (and no AWS variables): refused with the message that says what to set
    with pytest.raises(StorageAccessError, match="no S3 credentials found|access denied while"):
        fetch_one(StorageConfig(**{**common, "cache_dir": str(tmp_path / "c2")}))

    async def parameters() -> str:
        async with get_client() as prefect:
            return repr([r.parameters for r in await prefect.read_flow_runs()])

    out, err = capfd.readouterr()
    assert seaweed.secret_key not in out + err + anyio.run(parameters)
    assert seaweed.secret_key not in repr(StorageConfig(**common, credentials_block=block_name))
