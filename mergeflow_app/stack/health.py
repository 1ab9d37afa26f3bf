"""Which services are recorded, alive and healthy (HTTP health checks, the bucket through boto3), and the
environment that points Mergeflow at them."""

from __future__ import annotations

import shutil
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from mergeflow_app.stack import auth
from mergeflow_app.stack.config import (ARTIFACT_PREFIX, HOST, REGION, SERVICES, Credentials, StackConfig, StackError,
                                        resolve_credentials)
from mergeflow_app.stack.processes import StackRecord, locked, reap


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
    auth: bool = False  # started (or, stopped, set up) with authentication
    secrets: auth.StackSecrets | None = None

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

    def env(self, viewer: bool = False) -> dict[str, str]:
        """The variables a shell, a flow or a runner should set to use this stack; `viewer`: the read-only
        viewer's credentials instead of the runs' (authenticated stacks only)."""
        env = {"PREFECT_API_URL": f"{self.prefect_ui}/api", "MLFLOW_TRACKING_URI": self.mlflow_ui,
               "AWS_ENDPOINT_URL_S3": self.s3_endpoint, "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
               "AWS_DEFAULT_REGION": REGION}
        if viewer:
            if self.secrets is None:
                raise StackError(f"the stack in {self.state_dir} has no authentication, so no read-only viewer: "
                                 "start it with `mergeflow stack up --auth`")
            env.update(AWS_ACCESS_KEY_ID=self.secrets.s3_viewer_key,
                       AWS_SECRET_ACCESS_KEY=self.secrets.s3_viewer_secret)
            return {**env, **auth.client_env(self.secrets, viewer=True)}
        if self.credentials is not None:
            env["AWS_ACCESS_KEY_ID"] = self.credentials.access_key_id
            env["AWS_SECRET_ACCESS_KEY"] = self.credentials.secret_access_key
        if self.secrets is not None:
            env.update(auth.client_env(self.secrets))
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
        if self.auth:
            lines.append(f"  authentication: on (Prefect auth string, MLflow basic auth, S3 identities, SeaweedFS "
                         f"mutual TLS; secrets in {auth.auth_path_of(self.state_dir)}; read-only viewer: "
                         "`mergeflow stack env --viewer`); SeaweedFS runs as `weed server`, with no admin server "
                         "(the SeaweedFS admin ports stay unused)")
        lines.extend(f"  note: {note}" for note in self.notes)
        if self.running:
            lines.append("environment (eval \"$(mergeflow stack env)\"):")
            for key, value in self.env().items():
                shown = "<hidden; see `mergeflow stack env`>" if key in HIDDEN else value
                lines.append(f"  {key}={shown}")
        return "\n".join(lines)


HIDDEN = ("AWS_SECRET_ACCESS_KEY", "PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_PASSWORD")  # never printed by status


def service_url(port: int) -> str:
    return f"http://{HOST}:{port}"


def s3_client(endpoint: str, credentials: Credentials):
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


def healthy(service: str, port: int, bucket: str, credentials: Credentials | None,
            require_bucket: bool = True) -> bool:
    url = service_url(port)
    if service == "mlflow":
        return _http_ok(f"{url}/health")
    if service == "prefect":
        return _http_ok(f"{url}/api/health")
    if credentials is None or not port_open(port):
        return False
    try:
        client = s3_client(url, credentials)
        if require_bucket:  # healthy = a write goes through (right after start, the gateway answers before a
            client.head_bucket(Bucket=bucket)  # volume server has registered and writes fail)
            client.put_object(Bucket=bucket, Key=".mergeflow-health", Body=b"ok")
            client.delete_object(Bucket=bucket, Key=".mergeflow-health")
        else:
            client.list_buckets()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not healthy (yet)"
        return False


def low_disk(directory: Path) -> str:
    """Why SeaweedFS refuses writes under `directory`, if its disk is nearly full, else "".

    SeaweedFS marks every volume read-only while its disk has under 1% free (`weed mini` cannot lower that), so
    the S3 endpoint answers but no write goes through."""
    path = Path(directory)
    while not path.exists() and path != path.parent:
        path = path.parent
    usage = shutil.disk_usage(path)
    if usage.free >= usage.total / 100:
        return ""
    gib = 2**30
    return (f"the disk holding {directory} has {usage.free / gib:.1f} GiB free of {usage.total / gib:.0f} GiB, "
            f"under the 1% SeaweedFS needs to accept writes (it marks its volumes read-only); free some space")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex((HOST, port)) == 0


def status_unlocked(config: StackConfig, record: StackRecord, clean: bool) -> StackStatus:
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
        status = ServiceStatus(name, port, service_url(port))
        if entry is not None:
            status.recorded, status.pid, status.log, status.started = True, entry.pid, entry.log, entry.started
            status.alive = entry.identity_matches()
            if status.alive:
                status.healthy = healthy(name, port, record.bucket, credentials)
                if name == "s3" and not status.healthy:
                    status.detail = low_disk(config.state_dir / "seaweedfs")
            else:
                status.detail = ("PID reused by another process" if entry.pid_reused()
                                 else "process exited") + ("; record removed" if clean else "")
                if clean:
                    reap(entry.pid)
                    del record.services[name]
                    changed = True
        services[name] = status
    if changed:
        record.save(config)
    authenticated = record.auth if record.services else auth.remembered(config)
    secrets = auth.resolve_secrets(config, create=False) if authenticated else None
    return StackStatus(config.state_dir, services, record.bucket, credentials, notes, authenticated, secrets)


def status(config: StackConfig | None = None) -> StackStatus:
    """Which services are recorded, alive and healthy. Records of processes that are gone are removed."""
    config = config or StackConfig.from_env()
    if not config.state_dir.exists():
        record = StackRecord(bucket=config.bucket)
        return status_unlocked(config, record, clean=False)
    with locked(config):
        return status_unlocked(config, StackRecord.load(config), clean=True)
