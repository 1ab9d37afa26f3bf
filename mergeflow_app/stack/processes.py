"""What the stack started, by process identity: `/proc` (boot id + kernel start time) tells a live process from a
reused PID, `STATE/stack.json` records each service (written atomically), and a lock serialises up/down/status
per state directory."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mergeflow_app.stack.config import StackConfig, StackError, ensure_dir, write_private


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, process group, session, start time in clock ticks since boot) of a process, None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # field 3 (state) onwards; the name may contain spaces
    return fields[0], int(fields[2]), int(fields[3]), int(fields[19])


def _live(stat: tuple[str, int, int, int] | None) -> bool:
    return stat is not None and stat[0] not in ("Z", "X")


def _group_members(pgid: int) -> dict[int, int]:
    """{pid: start ticks} of the live processes in process group `pgid` (and session `pgid`)."""
    members: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        stat = proc_stat(int(entry.name))
        if _live(stat) and stat[1] == pgid and stat[2] == pgid:
            members[int(entry.name)] = stat[3]
    return members


@dataclass
class ProcessRecord:
    """One started server, as recorded in `STATE/stack.json`."""

    name: str
    pid: int
    port: int
    command: list[str]
    started: str  # ISO 8601, UTC
    log: str
    start_ticks: int  # /proc/PID/stat field 22: with the boot id, identifies this process (not just its PID)
    boot_id: str

    def identity_matches(self) -> bool:
        """The PID still belongs to the process we started (same boot, same kernel start time) and is alive."""
        stat = proc_stat(self.pid)
        return _live(stat) and stat[3] == self.start_ticks and self.boot_id == boot_id()

    def pid_reused(self) -> bool:
        stat = proc_stat(self.pid)
        return _live(stat) and not (stat[3] == self.start_ticks and self.boot_id == boot_id())


# Popen objects of the servers this process started, so that stopping them also reaps them (no zombies).
spawned: dict[int, subprocess.Popen] = {}


def stop_group(process: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Signal the process group a started process leads (it was started in a new session), wait for the leader,
    and SIGKILL the group after `timeout` s."""
    if process is None or process.poll() is not None:
        return
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def reap(pid: int) -> None:
    process = spawned.get(pid)
    if process is not None and process.poll() is not None:
        spawned.pop(pid, None)


def stop_record(record: ProcessRecord, timeout: float) -> str:
    """Stop the process group of `record` if (and only if) it is verifiably ours. Returns what happened."""
    if record.boot_id != boot_id():
        return "recorded before a reboot; nothing to stop"
    if record.pid_reused():
        return f"PID {record.pid} now belongs to another process; left alone"
    if record.identity_matches():
        # The leader is ours and alive, so the group id is ours; while the group has members the kernel cannot
        # hand its id to a new process, so signalling the group stays safe until it is empty.
        signals = [signal.SIGTERM, signal.SIGKILL]
        outcome = "stopped"
        for number, sig in enumerate(signals):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(record.pid, sig)
            deadline = time.monotonic() + (timeout if number == 0 else 10.0)
            while time.monotonic() < deadline:
                reap(record.pid)
                if not _group_members(record.pid):
                    return outcome
                time.sleep(0.1)
            outcome = f"killed (no exit {timeout:.0f} s after SIGTERM)"
        raise StackError(f"{record.name}: process group {record.pid} survived SIGKILL")
    # The leader is gone. Survivors in its group (same session id) can only be ours while the group never
    # emptied; they are signalled one by one, by PID, only if they started after our leader.
    survivors = {pid: ticks for pid, ticks in _group_members(record.pid).items() if ticks >= record.start_ticks}
    if not survivors:
        reap(record.pid)
        return "not running"
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, ticks in survivors.items():
            stat = proc_stat(pid)
            if _live(stat) and stat[3] == ticks:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            survivors = {p: t for p, t in survivors.items() if _live(s := proc_stat(p)) and s[3] == t}
            if not survivors:
                return "leader had exited; stopped the rest of its process group"
            time.sleep(0.1)
    raise StackError(f"{record.name}: processes {sorted(survivors)} survived SIGKILL")



@dataclass
class StackRecord:
    services: dict[str, ProcessRecord] = field(default_factory=dict)
    bucket: str = "mergeflow"
    access_key_id: str | None = None  # which credentials the S3 server enforces (never the secret)
    credentials_source: str | None = None
    auth: bool = False  # started with authentication (`up --auth`): status and env hand out its credentials

    @classmethod
    def load(cls, config: StackConfig) -> StackRecord:
        path = config.record_path
        if not path.exists():
            return cls(bucket=config.bucket)
        try:
            data = json.loads(path.read_text())
            services = {name: ProcessRecord(**entry) for name, entry in data.get("services", {}).items()}
            return cls(services, data.get("bucket", config.bucket), data.get("access_key_id"),
                       data.get("credentials_source"), bool(data.get("auth", False)))
        except (ValueError, TypeError) as exc:
            raise StackError(f"{path}: unreadable stack record ({exc}). Stop any servers it named by hand "
                             "and delete the file.") from exc

    def save(self, config: StackConfig) -> None:
        path = config.record_path
        if not self.services:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return
        ensure_dir(config.state_dir)
        data = {"version": 1, "bucket": self.bucket, "access_key_id": self.access_key_id,
                "credentials_source": self.credentials_source, "auth": self.auth,
                "services": {name: asdict(record) for name, record in self.services.items()}}
        write_private(path, json.dumps(data, indent=2) + "\n")


@contextlib.contextmanager
def locked(config: StackConfig):
    """One `up`/`down`/`status` at a time per state directory."""
    ensure_dir(config.state_dir)
    with open(config.state_dir / "stack.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
