"""Staging folders of a run that died (SIGKILL, killed for memory) are removed by the next staging folder made beside
them; a live process's, another host's and foreign folders are kept."""

from __future__ import annotations

import functools
import subprocess
import sys

from mergeflow import staging
from mergeflow.storage import staging_dir


@functools.cache
def _dead_owner() -> str:
    """The owner token of a process that has exited (as a SIGKILLed run's)."""
    code = "import sys; sys.path.insert(0, %r); from staging import owner; print(owner())" % staging.__file__.rsplit("/", 1)[0]
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_a_dead_runs_staging_folders_are_removed_and_the_rest_kept(tmp_path):
    cache_staging = tmp_path / "cache" / "staging"
    dead = cache_staging / f"out-{_dead_owner()}-abc123"
    (dead / "model.safetensors.part").parent.mkdir(parents=True)
    (dead / "model.safetensors.part").write_bytes(b"half a model")
    live = cache_staging / f"out-{staging.owner()}-live01"  # this process's: in use
    live.mkdir()
    host, pid, started = _dead_owner().split("x")
    elsewhere = cache_staging / f"out-{'0' * 8 if host != '0' * 8 else '1' * 8}x{pid}x{started}-remote"
    elsewhere.mkdir()  # another host's (a shared cache folder): its processes are not ours to judge
    foreign = cache_staging / "out-notours"
    foreign.mkdir()

    class Cache:
        root = tmp_path / "cache"

    fresh = staging_dir("s3://bucket/merged/run/model", Cache())
    assert fresh.parent == cache_staging and fresh.name.startswith(f"out-{staging.owner()}-")
    assert not dead.exists() and live.is_dir() and elsewhere.is_dir() and foreign.is_dir()


def test_local_outputs_partial_folders_of_a_dead_run_are_removed(tmp_path):
    final = tmp_path / "store" / "merged" / "run" / "model"
    final.parent.mkdir(parents=True)
    dead = final.parent / f".model.partial-{_dead_owner()}-x1"
    dead.mkdir()
    other_output = final.parent / f".other.partial-{_dead_owner()}-x2"  # another output's: swept when it is made
    other_output.mkdir()
    fresh = staging_dir(str(final))
    assert fresh.parent == final.parent and fresh.name.startswith(".model.partial-")
    assert not dead.exists() and other_output.is_dir()
