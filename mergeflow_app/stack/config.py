"""The local stack's settings: state directory, the twelve loopback ports (each movable by an environment
variable), the bucket, and the S3 credentials kept in the state directory."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from dataclasses import dataclass, field
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
# the ports of an authenticated stack's SeaweedFS (`weed server`, same flag names): every one but the admin server's
SERVER_PORT_FIELDS = tuple(name for name in WEED_PORT_FLAGS if not name.startswith("seaweed_admin"))


def port_setting(field: str) -> str:
    """The environment variable that moves a port of the stack."""
    return f"MERGEFLOW_STACK_{field.upper()}"


_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class StackError(MergeflowError):
    """The local stack could not be started, checked or stopped."""




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



@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str = field(repr=False)
    source: str = "file"  # "env" (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or "file" (STATE/credentials.json)


def write_private(path: Path, text: str) -> None:
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
    ensure_dir(config.state_dir)
    credentials = Credentials(f"mergeflow-{secrets.token_hex(6)}", secrets.token_urlsafe(30), "file")
    write_private(path, json.dumps({"access_key_id": credentials.access_key_id,
                                     "secret_access_key": credentials.secret_access_key}) + "\n")
    return credentials


def ensure_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
