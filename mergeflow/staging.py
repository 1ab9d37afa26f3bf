"""Folders an output is built in before it is published, named after the process that owns them (host, PID, start
time). Making one removes those beside it whose owner on this host is gone (SIGKILLed, killed for memory), so a
killed run leaves no half-built model on disk past the next run; another host's or a live process's are kept."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

_OWNER = re.compile(r"([0-9a-f]{8})x(\d+)x(\d+)-")


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def start_ticks(pid: int) -> int | None:
    """When a live process started (clock ticks since boot, Linux), 0 where /proc is absent, None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def owner() -> str:
    """This process, as written in the folders it owns."""
    return f"{_host()}x{os.getpid()}x{start_ticks(os.getpid()) or 0}"


def is_orphaned(name: str, prefix: str) -> bool:
    """Whether `name` is a `prefix` folder owned by a process of this host that is gone."""
    match = _OWNER.match(name[len(prefix):]) if name.startswith(prefix) else None
    if match is None or match[1] != _host():
        return False
    started = start_ticks(int(match[2]))
    return started is None or (started != int(match[3]) and started != 0)


def owned_dir(parent: Path, prefix: str) -> Path:
    """A fresh folder `parent/<prefix><owner>-<random>`, after removing the orphaned `prefix` folders there."""
    parent.mkdir(parents=True, exist_ok=True)
    for entry in os.scandir(parent):
        if entry.is_dir(follow_symlinks=False) and is_orphaned(entry.name, prefix):
            shutil.rmtree(entry.path, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{owner()}-", dir=parent))
