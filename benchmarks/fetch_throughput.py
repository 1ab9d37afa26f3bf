"""Fetch throughput from a local S3 server (SeaweedFS) through Mergeflow's content cache, against a plain boto3
download of the same objects, and the time of a second fetch served by the cache.

Starts `weed mini` on 127.0.0.1 (the tests' helper), uploads a checkpoint set of `--gb` GB (default 1) split
over `--files` safetensors files, then in one run:
  mergeflow   ContentCache.fetch of every object into an empty cache (sha256 computed and verified on the way)
  boto3       boto3 `download_file` of every object to a temporary folder (no hashing)
  cache hit   ContentCache.fetch again (ETag and size unchanged: no download)

    python benchmarks/fetch_throughput.py [--gb 1] [--files 4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from mergeflow.storage import upload_file  # noqa: E402

from mergeflow.content_cache import ContentCache
from s3_server import SeaweedServer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--files", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mergeflow-fetch-"))
    server = SeaweedServer(work / "s3")
    (work / "s3").mkdir()
    server.start()
    try:
        os.environ.update({"AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key,
                           "AWS_ENDPOINT_URL_S3": server.endpoint, "AWS_DEFAULT_REGION": "us-east-1"})
        client = server.client()
        client.create_bucket(Bucket="bench")
        per_file = int(args.gb * 1e9 / args.files / 4)
        uris = []
        for i in range(args.files):
            path = work / f"expert{i}.safetensors"
            save_file({"w": torch.randn(per_file, generator=torch.Generator().manual_seed(i))}, str(path))
            uris.append(f"s3://bench/experts/{path.name}")
            upload_file(path, uris[-1])
            path.unlink()
        total = sum(client.head_object(Bucket="bench", Key=u.split("bench/", 1)[1])["ContentLength"] for u in uris)

        cache = ContentCache(work / "cache")
        started = time.perf_counter()
        for uri in uris:
            cache.fetch(uri)
        mergeflow_s = time.perf_counter() - started

        target = work / "boto3"
        target.mkdir()
        started = time.perf_counter()
        for uri in uris:
            key = uri.split("bench/", 1)[1]
            client.download_file("bench", key, str(target / key.replace("/", "_")))
        boto3_s = time.perf_counter() - started

        started = time.perf_counter()
        for uri in uris:
            cache.fetch(uri)
        hit_s = time.perf_counter() - started

        gb = total / 1e9
        print(f"{args.files} objects, {gb:.2f} GB, SeaweedFS on 127.0.0.1")
        print(f"{'fetch':28s} {'seconds':>8s} {'GB/s':>7s}")
        print(f"{'mergeflow (sha256 verified)':28s} {mergeflow_s:8.2f} {gb / mergeflow_s:7.2f}")
        print(f"{'boto3 download_file':28s} {boto3_s:8.2f} {gb / boto3_s:7.2f}")
        print(f"{'mergeflow cache hit':28s} {hit_s:8.3f}")
        print(f"ratio mergeflow / boto3 time: {mergeflow_s / boto3_s:.2f}")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
