"""`mergeflow stack up --auth`: nobody in without a key.

Real SeaweedFS, MLflow and Prefect servers on ports that were free when the test began (as tests/test_stack.py),
with authentication on. Each service refuses a request without credentials and one with wrong credentials and
accepts the right ones, through the real clients (Prefect's client, MLflow's client, s3fs); the read-only viewer
reads but cannot write; SeaweedFS's own ports (gRPC, the master's, volume server's and filer's HTTP) refuse every
client without the stack's certificate, weed's own clients included. No secret appears on a server's command
line, and a real flow run (a tiny causal LM,
`mergeflow run` in a subprocess configured by `mergeflow stack env`) leaves none in what it wrote: its output,
the servers' logs and databases, MLflow's params, tags and artifacts, Prefect's logs, artifacts and parameters,
the bucket. Every server started here is stopped in teardown, even when a test fails."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from mergeflow_app import stack
from mergeflow_app.stack import StackConfig, StackError, auth, control, tls
from s3_server import listening_sockets, stack_on_free_ports

ROOT = Path(__file__).resolve().parents[1]
CLIENT_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL",
                    "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                    "MLFLOW_S3_ENDPOINT_URL", "PREFECT_API_URL", "PREFECT_API_AUTH_STRING", auth.AUTH_ENV)


def _secret_values(config: StackConfig) -> list[str]:
    """Every secret of the stack: its auth.json's, the runs' S3 secret key, and the Basic authorization headers
    the clients send (base64), should a server log a header."""
    secrets = auth.resolve_secrets(config, create=False)
    credentials = stack.resolve_credentials(config, create=False)
    assert secrets is not None and credentials is not None
    headers = [secrets.prefect_auth_string, f"{secrets.mlflow_admin_user}:{secrets.mlflow_admin_password}",
               f"{secrets.mlflow_viewer_user}:{secrets.mlflow_viewer_password}"]
    return [*secrets.values(), credentials.secret_access_key, *(base64.b64encode(h.encode()).decode() for h in headers)]


def _leaks(text: str | bytes, values: list[str]) -> list[str]:
    """The secrets found in `text`, each shown by its first four characters only."""
    blob = text if isinstance(text, bytes) else text.encode()
    return [value[:4] + "..." for value in values if value.encode() in blob]


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                members.append(int(entry))
    return members


def _stop_leftovers(config: StackConfig, pids: dict[str, int | None]) -> None:
    """Teardown's safety net: `down`, then SIGKILL to any recorded process group still alive."""
    try:
        stack.down(config)
    except Exception:  # noqa: BLE001 - fall through to the PID-level clean-up
        pass
    for pid in pids.values():
        if pid and _group_members(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def clean_env(monkeypatch):
    for name in CLIENT_VARIABLES:
        monkeypatch.delenv(name, raising=False)


# ------------------------------------------------------------------------------------------- no servers


def test_the_state_dir_remembers_auth_and_keeps_its_secrets_private(tmp_path, clean_env, monkeypatch):
    config = StackConfig(state_dir=tmp_path / "state")
    assert not auth.wanted(config, None), "without --auth or MERGEFLOW_STACK_AUTH a stack starts open, as before"
    assert control._auth_secrets(config, control.StackRecord(), None) is None
    assert not auth.auth_path(config).exists()
    monkeypatch.setenv(auth.AUTH_ENV, "maybe")
    with pytest.raises(StackError, match="MERGEFLOW_STACK_AUTH='maybe'"):
        auth.wanted(config, None)
    monkeypatch.setenv(auth.AUTH_ENV, "1")
    assert auth.wanted(config, None) and auth.wanted(config, True)

    first = auth.resolve_secrets(config)
    assert stat.S_IMODE(auth.auth_path(config).stat().st_mode) == 0o600
    assert auth.resolve_secrets(config) == first, "secrets are generated once"
    assert not _leaks(repr(first), first.values()) and len(set(first.values())) == len(first.values())
    monkeypatch.delenv(auth.AUTH_ENV)
    assert auth.wanted(config, None), "the state directory remembers the choice"
    monkeypatch.setenv(auth.AUTH_ENV, "0")
    with pytest.raises(StackError, match="auth.json: this state directory was set up with authentication"):
        auth.wanted(config, None)

    redacted = auth.redact(f"log says {first.mlflow_admin_password}", first)
    assert redacted == "log says ***"
    other = StackConfig(state_dir=tmp_path / "other")
    auth.mlflow_auth_db(other).parent.mkdir(parents=True)
    auth.mlflow_auth_db(other).write_bytes(b"")
    with pytest.raises(StackError, match="mlflow-auth.db exists but .*auth.json does not"):
        auth.resolve_secrets(other)


def test_cli_switches():
    from mergeflow_app.cli import build_parser

    parser = build_parser()
    up = parser.parse_args(["stack", "up", "--auth"])
    assert (up.action, up.auth, up.viewer) == ("up", True, False)
    plain = parser.parse_args(["stack", "env", "--viewer"])
    assert (plain.action, plain.auth, plain.viewer) == ("env", None, True), "no --auth: the env var or the dir decide"


def test_server_files_and_command_lines_carry_no_secret(tmp_path, clean_env):
    config = stack_on_free_ports(tmp_path / "state")
    secrets = auth.resolve_secrets(config)
    credentials = stack.resolve_credentials(config)
    auth.write_server_files(config, secrets, credentials)
    values = _secret_values(config)

    identities = json.loads((auth.server_dir(config) / "s3.json").read_text())["identities"]
    assert stat.S_IMODE((auth.server_dir(config) / "s3.json").stat().st_mode) == 0o600
    actions = {i["name"]: set(i["actions"]) for i in identities}
    assert "Write" in actions["mergeflow-runs"] and actions["mergeflow-viewer"] == {"Read", "List"}
    assert "anonymous" not in actions, "no anonymous identity: anonymous requests are refused"
    ini = (auth.server_dir(config) / "mlflow-auth.ini").read_text()
    assert not _leaks(ini, values) and "default_permission = READ" in ini and str(config.state_dir) in ini

    for service in ("s3", "mlflow", "prefect"):
        open_command = control._command(service, config, "mergeflow")
        assert open_command == control._base_command(service, config, "mergeflow"), "open stack: as before"
        assert not any("s3.config" in arg or arg == "basic-auth" for arg in open_command)
        command = control._command(service, config, "mergeflow", authenticated=True)
        assert not _leaks(" ".join(command), values), service
        environment = control._environment(service, config, credentials, secrets)
        assert not _leaks(json.dumps(control._environment(service, config, credentials)),
                          secrets.values()), "an open stack's servers get none of the auth secrets"
        if service == "prefect":
            assert environment["PREFECT_SERVER_API_AUTH_STRING"] == secrets.prefect_auth_string
        if service == "mlflow":
            assert command[command.index("--app-name") + 1] == "basic-auth"
            assert environment["MLFLOW_AUTH_ADMIN_PASSWORD"] == secrets.mlflow_admin_password
            assert environment["MLFLOW_AUTH_CONFIG_PATH"].endswith("mlflow-auth.ini")
        if service == "s3":
            assert f"-s3.config={auth.server_dir(config) / 's3.json'}" in command
            assert command[1] == "server" and open_command[1] == "mini", "authenticated: no admin server"
            assert {f"-{flag}={getattr(config, name)}" for name, flag in stack.WEED_PORT_FLAGS.items()
                    if "admin" not in name} <= set(command) and not any("admin" in arg for arg in command)
            assert {"-filer", "-s3", "-volume.max=0", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                    f"-dir={config.state_dir / 'seaweedfs'}", "-ip.bind=127.0.0.1"} <= set(command)
            assert not any(arg.startswith(("-metricsPort", "-debug")) for arg in command)
            assert set(control._ports_needed("s3", config, authenticated=True).values()) == set(
                control._ports_needed("s3", config).values()) - {"seaweed_admin_port", "seaweed_admin_grpc_port"}
            assert "AWS_SECRET_ACCESS_KEY" not in environment and environment["WEED_JWT_FILER_SIGNING_KEY"]
            assert environment["WEED_MASTER_VOLUME_GROWTH_COPY_1"] == "1", "one volume at a time, as weed mini"

    data = config.state_dir / "seaweedfs"
    size = control._mini_volume_size_mb(data)  # mini's choice: a hundredth of the disk, a power of 2 in 64-1024 MB
    assert 64 <= size <= 1024 and size & (size - 1) == 0
    assert f"-master.volumeSizeLimitMB={size}" in control._command("s3", config, "mergeflow", authenticated=True)
    (data / "mini.options").write_text("# by weed mini\nmaster.volumeSizeLimitMB=256\n")
    assert control._mini_volume_size_mb(data) == 256, "a directory mini made keeps its volume size"

    security = tls.security_path(config).read_text()  # read by weed from its working directory
    assert tls.security_path(config).parent == config.state_dir and not _leaks(security, values)
    ca, cert, key = tls.client_files(config.state_dir)
    for component in (*tls.GRPC_SERVERS, "client"):
        assert f'[grpc.{component}]\ncert = "{cert}"\nkey = "{key}"' in security, component
    for component in (*tls.HTTPS_SERVERS, "client"):
        assert f'[https.{component}]' in security and f'ca = "{ca}"' in security, component
    assert "enabled = true" in security and "[https.s3]" not in security, "S3 stays plain HTTP (signed requests)"
    for path in (ca, cert, key, tls.security_path(config)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert b"PRIVATE KEY" in key.read_bytes() and not list(ca.parent.glob("*ca*.key")), "the CA's key is not kept"
    before = key.read_bytes()
    auth.write_server_files(config, secrets, credentials)
    assert key.read_bytes() == before, "the certificates are generated once"


def test_mlflow_gate_lets_a_read_only_user_read_only():
    spec = importlib.util.spec_from_file_location("gate", auth.GATE_DIR / "mergeflow_mlflow_gate.py")
    gate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gate)
    assert gate.READ_ONLY_USERS_ENV == auth.READ_ONLY_USERS_ENV
    reads = [("GET", "/api/2.0/mlflow/runs/get"), ("POST", "/api/2.0/mlflow/runs/search"),
             ("POST", "/ajax-api/2.0/mlflow/experiments/search"), ("POST", "/graphql"),
             ("POST", "/api/2.0/mlflow/logged-models/search"), ("HEAD", "/")]
    writes = [("POST", "/api/2.0/mlflow/experiments/create"), ("POST", "/api/2.0/mlflow/runs/create"),
              ("POST", "/api/2.0/mlflow/registered-models/create"), ("PATCH", "/api/2.0/mlflow/users/update-password"),
              ("DELETE", "/api/2.0/mlflow/experiments/delete"), ("POST", "/api/2.0/mlflow/research-notes"),
              ("PUT", "/api/2.0/mlflow-artifacts/artifacts/x")]
    assert all(gate.reads_only(*r) for r in reads) and not any(gate.reads_only(*w) for w in writes)


def test_compose_auth_override_has_the_same_switches_and_no_secret():
    base = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    text = (ROOT / "docker" / "compose.auth.yaml").read_text()
    override = yaml.safe_load(text)
    added = set(override["services"]) - set(base["services"])
    assert {"s3", "mlflow", "prefect", "worker", "runner"} <= set(override["services"]) and added == {"mlflow-viewer"}
    assert set(override["services"]["mlflow-viewer"]["depends_on"]) <= set(base["services"])
    listed = {line.split("=", 1)[0] for line in (ROOT / "docker" / "auth.env.example").read_text().splitlines()
              if line and not line.startswith("#")}
    required = set(re.findall(r"\$\{([A-Z_]+):\?", re.sub(r"(?m)^\s*#.*$", "", text)))
    assert required <= listed, f"docker/auth.env.example lacks {sorted(required - listed)}"
    assert all(line.endswith("=") for line in (ROOT / "docker" / "auth.env.example").read_text().splitlines()
               if line and not line.startswith("#")), "the example holds no value"
    prefect = override["services"]["prefect"]["environment"]
    assert prefect["PREFECT_SERVER_API_AUTH_STRING"].startswith("${PREFECT_API_AUTH_STRING:?")
    mlflow = override["services"]["mlflow"]
    assert "basic-auth" in mlflow["command"] and mlflow["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"].startswith("${")
    s3_command = override["services"]["s3"]["command"]
    assert any("-s3.config=" in arg for arg in s3_command)
    assert s3_command[0] == "server" and {"-filer", "-s3", "-volume.max=0"} <= set(s3_command), "no admin server"
    assert not any("admin" in arg or arg.startswith(("-metricsPort", "-debug")) for arg in s3_command)
    for client in ("worker", "runner"):
        env = override["services"][client]["environment"]
        assert {"PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(env)
    interpolated = {name: re.sub(r"\$\{[A-Z_]+:[?-][^}]*\}", "x", config["content"])
                    for name, config in override["configs"].items()}
    identities = {i["name"]: i["actions"] for i in json.loads(interpolated["s3-identities"])["identities"]}
    assert identities["mergeflow-viewer"] == auth.VIEWER_ACTIONS and identities["mergeflow-runs"] == auth.RUNS_ACTIONS
    assert "authorization_function = " + auth.GATE_FUNCTION in interpolated["mlflow-auth-ini"]
    security = tomllib.loads(override["configs"]["seaweedfs-security"]["content"])
    mounted = (f"/run/secrets/seaweedfs-{name}" for name in ("ca", "cert", "key"))
    assert security == tomllib.loads(tls.security_toml(*mounted)), "the certificate is required where locally"
    s3 = override["services"]["s3"]
    assert {"source": "seaweedfs-security", "target": "/etc/seaweedfs/security.toml"} in s3["configs"]
    assert set(s3["secrets"]) == set(override["secrets"]) == {"seaweedfs-ca", "seaweedfs-cert", "seaweedfs-key"}
    compile(override["services"]["mlflow-viewer"]["command"][0], "mlflow-viewer", "exec")
    for name, value in _variables(override):  # every secret comes from the environment, none is written here
        if any(word in name for word in ("PASSWORD", "SECRET", "AUTH_STRING", "_KEY")):
            assert value.startswith("${") and ":?" in value, (name, value)


def _variables(node, name: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _variables(value, str(key))
    elif isinstance(node, list):
        for item in node:
            yield from _variables(item, name)
    elif isinstance(node, str) and name:
        yield name, node


# ----------------------------------------------------------------------------------------- real servers


@pytest.fixture(scope="module")
def authed(tmp_path_factory):
    """One real stack with authentication on for the tests below; always stopped."""
    with pytest.MonkeyPatch.context() as mp:
        for name in CLIENT_VARIABLES:
            mp.delenv(name, raising=False)
        config = stack_on_free_ports(tmp_path_factory.mktemp("authed") / "state", startup_timeout=240)
        started = time.monotonic()
        result = None
        try:
            result = stack.up(config, authenticated=True)
            print(f"stack up --auth took {time.monotonic() - started:.1f} s")
            yield config, result
        finally:
            pids = result.pids if result else {
                name: entry.pid for name, entry in control.StackRecord.load(config).services.items()}
            _stop_leftovers(config, pids)


def test_authed_stack_is_healthy_and_no_secret_is_on_a_command_line(authed, capsys, monkeypatch):
    config, result = authed
    assert result.healthy and result.auth
    values = _secret_values(config)
    record = json.loads(config.record_path.read_text())
    assert record["auth"] is True and not _leaks(json.dumps(record), values)
    seen = 0
    for name, pid in result.pids.items():
        members = _group_members(pid)
        assert members, name
        for member in members:  # the server and every child it started (uvicorn, job runners, ...)
            try:
                cmdline = Path(f"/proc/{member}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            seen += 1
            assert not _leaks(cmdline, values), f"{name} pid {member}: a secret on its command line"
    assert seen >= 3
    assert not _leaks(result.format(), values), "status prints no secret"
    monkeypatch.setenv(auth.AUTH_ENV, "0")
    with pytest.raises(StackError, match="stays so"):
        stack.up(config)
    monkeypatch.delenv(auth.AUTH_ENV)
    assert stack.stack_command("up", str(config.state_dir)) == 0, "up again remembers --auth"
    assert "already running: s3, mlflow, prefect" in capsys.readouterr().out


def test_prefect_refuses_requests_without_the_auth_string(authed):
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    config, result = authed
    env = result.env()
    values = _secret_values(config)

    async def flow_runs() -> int:
        async with get_client() as client:
            return len(await client.read_flow_runs(limit=5))

    for label, auth_string in (("none", None), ("wrong", "mergeflow:wrong-string"),
                               ("wrong user", "someone:" + env["PREFECT_API_AUTH_STRING"].split(":", 1)[1])):
        updates = {PREFECT_API_URL: env["PREFECT_API_URL"]}
        if auth_string:
            updates[PREFECT_API_AUTH_STRING] = auth_string
        with temporary_settings(updates=updates, restore_defaults=set() if auth_string else {PREFECT_API_AUTH_STRING}):
            with pytest.raises(PrefectHTTPStatusError, match="401") as refused:
                anyio.run(flow_runs)
        assert not _leaks(str(refused.value), values), label
    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"],
                                     PREFECT_API_AUTH_STRING: env["PREFECT_API_AUTH_STRING"]}):
        assert anyio.run(flow_runs) >= 0
    with urllib.request.urlopen(env["PREFECT_API_URL"] + "/health", timeout=10) as response:
        assert response.status == 200, "health stays open (stack status, load balancers)"


def _mlflow_client(monkeypatch, uri: str, user: str | None, password: str | None):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    for key, value in (("MLFLOW_TRACKING_USERNAME", user), ("MLFLOW_TRACKING_PASSWORD", password)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    return MlflowClient(uri)


def test_mlflow_refuses_strangers_and_its_viewer_only_reads(authed, monkeypatch):
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    config, result = authed
    env, viewer = result.env(), result.env(viewer=True)
    uri, values = env["MLFLOW_TRACKING_URI"], _secret_values(config)
    admin = _mlflow_client(monkeypatch, uri, env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"])
    experiment = admin.create_experiment("auth-probe")
    run = admin.create_run(experiment)
    admin.log_param(run.info.run_id, "probe", "1")

    for label, user, password in (("none", None, None), ("wrong", env["MLFLOW_TRACKING_USERNAME"], "not-it-at-all"),
                                  ("unknown", "nobody", viewer["MLFLOW_TRACKING_PASSWORD"])):
        stranger = _mlflow_client(monkeypatch, uri, user, password)
        with pytest.raises(MlflowException, match="401") as refused:
            stranger.get_run(run.info.run_id)
        with pytest.raises(MlflowException, match="401"):
            stranger.create_run(experiment)
        assert not _leaks(str(refused.value), values), label

    reader = _mlflow_client(monkeypatch, uri, viewer["MLFLOW_TRACKING_USERNAME"], viewer["MLFLOW_TRACKING_PASSWORD"])
    assert reader.get_run(run.info.run_id).data.params == {"probe": "1"}
    assert [r.info.run_id for r in reader.search_runs([experiment])] == [run.info.run_id]
    assert "auth-probe" in [e.name for e in reader.search_experiments()]
    for label, write in (("create a run", lambda: reader.create_run(experiment)),
                         ("create an experiment", lambda: reader.create_experiment("viewer-made")),
                         ("log a parameter", lambda: reader.log_param(run.info.run_id, "viewer", "x")),
                         ("register a model", lambda: reader.create_registered_model("viewer-model"))):
        with pytest.raises(MlflowException, match="403") as refused:
            write()
        assert not _leaks(str(refused.value), values), label
    admin = _mlflow_client(monkeypatch, uri, env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"])
    assert admin.get_experiment_by_name("viewer-made") is None


def test_s3_refuses_anonymous_and_wrong_keys_and_its_viewer_only_reads(authed):
    import s3fs

    config, result = authed
    env, viewer = result.env(), result.env(viewer=True)
    endpoint, values = env["AWS_ENDPOINT_URL_S3"], _secret_values(config)

    def filesystem(**credentials) -> s3fs.S3FileSystem:
        return s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True, use_listings_cache=False,
                                 config_kwargs={"retries": {"max_attempts": 1}}, **credentials)

    runs = filesystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"])
    path = f"{config.bucket}/probe/auth.txt"
    runs.pipe(path, b"only with a key")
    assert runs.cat(path) == b"only with a key"

    for label, stranger in (("anonymous", filesystem(anon=True)),
                            ("wrong secret", filesystem(key=env["AWS_ACCESS_KEY_ID"], secret="wrong-secret-key")),
                            ("unknown key", filesystem(key="nobody", secret=env["AWS_SECRET_ACCESS_KEY"]))):
        for attempt in (lambda: stranger.cat(path), lambda: stranger.ls(f"{config.bucket}/probe"),
                        lambda: stranger.pipe(f"{config.bucket}/probe/stranger.txt", b"x")):
            with pytest.raises((PermissionError, OSError)) as refused:
                attempt()
            assert not _leaks(str(refused.value), values), label

    reader = filesystem(key=viewer["AWS_ACCESS_KEY_ID"], secret=viewer["AWS_SECRET_ACCESS_KEY"])
    assert reader.cat(path) == b"only with a key"
    assert f"{config.bucket}/probe/auth.txt" in reader.ls(f"{config.bucket}/probe")
    for attempt in (lambda: reader.pipe(f"{config.bucket}/probe/viewer.txt", b"x"), lambda: reader.rm_file(path),
                    lambda: reader.mkdir("viewer-bucket")):
        with pytest.raises(PermissionError):
            attempt()
    reader.rm(path)  # a bulk delete (DeleteObjects) reports refusals per key, and s3fs does not raise them
    assert runs.cat(path) == b"only with a key" and not runs.exists(f"{config.bucket}/probe/viewer.txt")

    # SeaweedFS's own HTTP ports answer only requests the cluster signed (JWT keys from auth.json), even from a
    # client that shows the stack's certificate (anonymous ones are refused before: see the mutual TLS tests)
    for url in (f"https://127.0.0.1:{config.seaweed_filer_port}/buckets/{config.bucket}/probe/auth.txt",
                f"https://127.0.0.1:{config.seaweed_filer_port}/buckets/{config.bucket}/probe/"):
        with pytest.raises(urllib.error.HTTPError, match="401"):
            _https(config, certificate=True).open(url, timeout=10)


def _https(config: StackConfig, certificate: bool) -> urllib.request.OpenerDirector:
    """An HTTPS opener that trusts the stack's CA and shows its client certificate, or shows none."""
    ca, cert, key = tls.client_files(config.state_dir)
    context = ssl.create_default_context(cafile=str(ca)) if ca.exists() else ssl._create_unverified_context()
    if certificate:
        context.load_cert_chain(cert, key)
    return urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))


def _tls_probe(port: int, grpc: bool, client: tuple[Path, Path, Path] | None = None) -> str:
    """A TLS handshake, then a gRPC preface (or an HTTP GET) and a read: "" when the server answered, else why
    not. Without `client` it shows no certificate and does not check the server's."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    if client:
        context.load_verify_locations(client[0])
        context.load_cert_chain(client[1], client[2])
        context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["h2" if grpc else "http/1.1"])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\4\0\0\0\0\0" if grpc else b"GET / HTTP/1.0\r\n\r\n")
            return "" if sock.recv(16) else "closed without an answer"
    except (ssl.SSLError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"


def _weed(args: list[str], cwd: Path, stdin: str = "", timeout: float = 30) -> str:
    """A weed client run in `cwd` (HOME too, so that only a security.toml there counts): what it printed."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("WEED_")}
    env["HOME"] = str(cwd)
    try:
        run = subprocess.run([control.find_executable("weed"), *args], input=stdin.encode(), cwd=cwd, env=env,
                             capture_output=True, timeout=timeout)
        return (run.stdout + run.stderr).decode(errors="replace")
    except subprocess.TimeoutExpired as exc:
        return f"(timed out) {((exc.stdout or b'') + (exc.stderr or b'')).decode(errors='replace')}"


def test_seaweedfs_grpc_and_http_ports_refuse_a_client_without_the_certificate(authed):
    """Every gRPC port (master, volume, filer, S3) and the master's, volume server's and filer's HTTP ports:
    a plaintext client gets no answer, a TLS client that shows no certificate is refused by the server's alert,
    the stack's certificate gets in. SeaweedFS's Unix sockets (/tmp/seaweedfs-*.sock) are its owner's alone."""
    config, _ = authed
    for name in (*tls.GRPC_PORTS, *tls.HTTPS_PORTS):
        port, grpc = getattr(config, name), name in tls.GRPC_PORTS
        assert not tls.answers_plaintext(port, grpc=grpc), f"{name} ({port}) serves a plaintext client"
        refused = _tls_probe(port, grpc)
        assert "CERTIFICATE_REQUIRED" in refused, f"{name} ({port}): {refused or 'served a client without one'}"
    for name in (*tls.GRPC_PORTS, *tls.HTTPS_PORTS):
        assert _tls_probe(getattr(config, name), name in tls.GRPC_PORTS, tls.client_files(config.state_dir)) == "", name
    sockets = {f"/tmp/seaweedfs-{name}-{getattr(config, field)}.sock": field for name, field in (
        ("master-grpc", "seaweed_master_grpc_port"), ("volume-grpc", "seaweed_volume_grpc_port"),
        ("filer-grpc", "seaweed_filer_grpc_port"), ("s3-grpc", "s3_grpc_port"),
        ("filer", "seaweed_filer_port"), ("s3", "s3_port"))}
    modes = {path: stat.S_IMODE(os.stat(path).st_mode) for path in sockets if os.path.exists(path)}
    assert len(modes) >= 5 and all(mode & 0o077 == 0 for mode in modes.values()), {p: oct(m) for p, m in modes.items()}


def test_seaweedfs_master_http_api_refuses_anonymous_requests(authed):
    """The master's HTTP API (which hands out write JWTs for the volume servers) and the volume server's status:
    refused to a plain HTTP client and to an HTTPS one without the certificate; served with it."""
    config, _ = authed
    master, volume = config.seaweed_master_port, config.seaweed_volume_port
    anonymous = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    urls = [f"127.0.0.1:{master}{path}" for path in ("/dir/assign", "/dir/status", "/cluster/status", "/vol/status",
                                                        "/dir/lookup?volumeId=1", "/")]
    for url in [*urls, f"127.0.0.1:{volume}/status"]:
        with pytest.raises(urllib.error.HTTPError, match="400") as plain:  # Go: "HTTP request to an HTTPS server"
            anonymous.open(f"http://{url}", timeout=10).read()
        assert b"HTTPS server" in plain.value.read(), url
        with pytest.raises(OSError, match="CERTIFICATE_REQUIRED"):  # ssl.SSLError, or urllib's URLError around it
            _https(config, certificate=False).open(f"https://{url}", timeout=10).read()
    with _https(config, certificate=True).open(f"https://127.0.0.1:{master}/cluster/status", timeout=10) as response:
        assert json.loads(response.read())["IsLeader"] is True


SEAWEED_PORTS = ("s3_port", "s3_grpc_port", "seaweed_master_port", "seaweed_master_grpc_port", "seaweed_volume_port",
                 "seaweed_volume_grpc_port", "seaweed_filer_port", "seaweed_filer_grpc_port")  # no admin server's


def _anonymous_get(url: str) -> tuple[int, bytes]:
    """A GET without credentials or certificate: (status, body); (0, b"") when no HTTP answer came."""
    context = ssl._create_unverified_context()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(url, timeout=10) as response:
            return response.status, response.read(100_000)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(100_000)
    except OSError:
        return 0, b""


def test_seaweedfs_runs_no_admin_server_and_listens_only_on_its_ports(authed):
    """The authenticated stack's SeaweedFS (`weed server`, not `weed mini`) listens on 127.0.0.1 on exactly the
    stack's eight SeaweedFS ports: no admin server (its configured ports stay closed), no metrics, WebDAV,
    Iceberg or debug port."""
    config, result = authed
    listening = listening_sockets(_group_members(result.pids["s3"]))
    expected = {("127.0.0.1", getattr(config, name)) for name in SEAWEED_PORTS}
    assert listening == expected, f"unexpected: {sorted(listening - expected)}, missing: {sorted(expected - listening)}"
    for name in ("seaweed_admin_port", "seaweed_admin_grpc_port"):
        assert not control.port_open(getattr(config, name)), f"{name} ({getattr(config, name)}) is listening"


def test_no_seaweedfs_port_serves_metrics_or_status_anonymously(authed):
    """`/metrics` (Prometheus counters, bucket names among their labels) is served to no anonymous client, over
    HTTP or HTTPS, on any port SeaweedFS listens on or was configured with. The S3 gateway's `/healthz`, `/readyz`
    and `/status` stay open as liveness probes (an empty 200: no bucket, no count, no version in the body)."""
    config, result = authed
    ports = {port for _, port in listening_sockets(_group_members(result.pids["s3"]))} | {
        config.seaweed_admin_port, config.seaweed_admin_grpc_port}
    served = {}
    for port in sorted(ports):
        for scheme in ("http", "https"):
            code, body = _anonymous_get(f"{scheme}://127.0.0.1:{port}/metrics")
            if code == 200 or b"# TYPE" in body or config.bucket.encode() in body:
                served[f"{scheme}://127.0.0.1:{port}/metrics"] = (code, body[:200])
    assert not served, served
    for path in ("/healthz", "/readyz", "/status"):  # one handler in SeaweedFS: an empty 200, liveness only
        code, body = _anonymous_get(f"http://127.0.0.1:{config.s3_port}{path}")
        assert (code, body) == (200, b""), (path, code, body[:300])


def test_weed_clients_need_the_stacks_security_toml(authed, tmp_path):
    """`weed upload` (master gRPC, then a volume server) and `weed shell` run anywhere else are refused; run in
    the state directory, where `up --auth` wrote security.toml, they get in."""
    config, _ = authed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.txt").write_text("anonymous")
    master = f"127.0.0.1:{config.seaweed_master_port}.{config.seaweed_master_grpc_port}"
    filer = f"127.0.0.1:{config.seaweed_filer_port}.{config.seaweed_filer_grpc_port}"
    upload = _weed(["upload", f"-master={master}", str(elsewhere / "x.txt")], elsewhere)
    assert '"fid"' not in upload and "Unavailable" in upload, upload[-500:]
    shell = _weed(["shell", f"-master={master}", f"-filer={filer}"], elsewhere, "cluster.ps\n", timeout=15)
    assert "volume servers" not in shell and "mergeflow" not in shell, shell[-500:]

    assert '"fid"' in _weed(["upload", f"-master={master}", str(elsewhere / "x.txt")], config.state_dir)
    assert "volume servers" in _weed(["shell", f"-master={master}", f"-filer={filer}"], config.state_dir,
                                     "cluster.ps\n", timeout=60)


def test_env_hands_out_the_runs_and_the_viewers_credentials(authed, capsys):
    config, result = authed
    assert stack.stack_command("env", str(config.state_dir)) == 0
    exports = dict(line.removeprefix("export ").split("=", 1) for line in capsys.readouterr().out.splitlines())
    env = result.env()
    assert {"PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(exports)
    assert exports["MLFLOW_TRACKING_USERNAME"] == env["MLFLOW_TRACKING_USERNAME"] == "mergeflow-admin"
    assert stack.stack_command("env", str(config.state_dir), viewer=True) == 0
    viewer = dict(line.removeprefix("export ").split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert viewer["MLFLOW_TRACKING_USERNAME"] == "mergeflow-viewer" and "PREFECT_API_AUTH_STRING" not in viewer
    assert viewer["AWS_ACCESS_KEY_ID"] != env["AWS_ACCESS_KEY_ID"]
    assert stack.stack_command("status", str(config.state_dir)) == 0
    shown = capsys.readouterr().out
    assert "authentication: on" in shown and not _leaks(shown, _secret_values(config))


def _tiny_flow_inputs(directory: Path) -> tuple[Path, list[dict]]:
    """A tiny random Llama (its tokenizer learnt from a few sentences) and two yes/no tasks in the causal_lm
    layout: a flow over them runs in seconds of compute."""
    from mergeflow.families.causal_lm.data import ChoiceSplit, save_causal_task
    from tiny_causal_lm import tiny_causal_lm_dir

    words = ["apple", "river", "stone", "cloud", "ember", "maple", "orbit", "quartz", "tulip", "violet", "willow",
             "zephyr"]
    base = tiny_causal_lm_dir(directory / "base", "llama",
                              [f"The {a} and the {b} met by the {c}." for a in words for b in words[:4]
                               for c in words[4:6]])
    tasks = []
    for name, rule in (("parity", lambda i, w: i % 2), ("vowel", lambda i, w: int(w[0] in "aeiou"))):
        rows = [(f"Word: {w}{i}\nAnswer:", rule(i, w)) for i, w in enumerate(words * 3)]

        def split(part):
            return ChoiceSplit([q for q, _ in part], [("yes", "no")] * len(part), [a for _, a in part])

        save_causal_task({"train": split(rows[:16]), "validation": split(rows[16:24]), "test": split(rows[24:32])},
                         directory / "data" / name)
        tasks.append({"name": name, "dataset": str(directory / "data" / name)})
    return base, tasks


def test_a_flow_run_on_the_authed_stack_leaks_no_secret(authed, tmp_path):
    """`mergeflow run` configured by `mergeflow stack env` alone (credentials from the environment, never argv);
    then every place the run wrote is searched for every secret."""
    import anyio
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    config, result = authed
    values, env = _secret_values(config), result.env()
    base, tasks = _tiny_flow_inputs(tmp_path)
    run_config = tmp_path / "run.yaml"
    run_config.write_text(yaml.safe_dump({
        "name": "authrun", "model": {"family": "causal_lm", "pretrained": str(base)}, "tasks": tasks,
        "finetune": {"steps": 2, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0, "max_length": 16},
        "evaluation": {"batch_size": 8, "max_length": 16}, "merges": [{"method": "task_arithmetic"}],
        "storage": {"root": f"s3://{config.bucket}/store", "cache_dir": str(tmp_path / "cache")},
        "tracking": {"tracking_uri": env["MLFLOW_TRACKING_URI"], "experiment": "authrun",
                     "registered_model": "auth-merged"},
        "device": "cpu"}))
    process_env = {key: value for key, value in os.environ.items() if key not in CLIENT_VARIABLES}
    process_env.update(env, PREFECT_HOME=str(tmp_path / "prefect-home"), MLFLOW_DISABLE_TELEMETRY="true",
                       PREFECT_SERVER_ANALYTICS_ENABLED="false")
    started = time.monotonic()
    run = subprocess.run([str(Path(sys.executable).parent / "mergeflow"), "run", str(run_config)], env=process_env,
                         capture_output=True, timeout=600, cwd=tmp_path)
    print(f"flow run on the authed stack took {time.monotonic() - started:.1f} s")
    assert run.returncode == 0, run.stderr.decode(errors="replace")[-3000:]
    found: dict[str, list[str]] = {}

    def check(where: str, blob: str | bytes) -> None:
        if hits := _leaks(blob, values):
            found[where] = hits

    check("the run's stdout", run.stdout)
    check("the run's stderr", run.stderr)
    secret_files = {auth.auth_path(config), config.credentials_path, auth.server_dir(config) / "s3.json"}
    checked_files = 0
    for directory in (config.state_dir, tmp_path / "cache", tmp_path / "prefect-home"):
        for path in directory.rglob("*"):  # server logs, MLflow's and Prefect's databases, SeaweedFS's volumes
            if path.is_file() and path not in secret_files:
                check(str(path), path.read_bytes())
                checked_files += 1
    assert checked_files > 10 and any(p.name == "prefect.log" for p in (config.state_dir / "logs").iterdir())

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_USERNAME", env["MLFLOW_TRACKING_USERNAME"])
        mp.setenv("MLFLOW_TRACKING_PASSWORD", env["MLFLOW_TRACKING_PASSWORD"])
        tracking = MlflowClient(env["MLFLOW_TRACKING_URI"])
        experiment = tracking.get_experiment_by_name("authrun")
        runs = tracking.search_runs([experiment.experiment_id])
        assert runs
        for mlflow_run in runs:
            check(f"MLflow run {mlflow_run.info.run_name}", repr((mlflow_run.data.params, mlflow_run.data.tags,
                                                                  mlflow_run.data.metrics, mlflow_run.inputs)))
        versions = tracking.search_model_versions("name='auth-merged'")
        assert versions
        check("MLflow model versions", repr([(v.tags, v.description, v.source) for v in versions]))

    import boto3

    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    keys = [item["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=config.bucket)
            for item in page.get("Contents", [])]
    assert any(key.startswith("mlflow-artifacts/") for key in keys) and any(key.startswith("store/") for key in keys)
    for key in keys:  # weights, manifests, MLflow's artifacts, summaries
        check(f"s3://{config.bucket}/{key}", s3.get_object(Bucket=config.bucket, Key=key)["Body"].read())

    async def prefect_records() -> tuple[list, list, list]:
        async with get_client() as client:
            flow_runs = await client.read_flow_runs()
            return flow_runs, await client.read_logs(), await client.read_artifacts()

    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"],
                                     PREFECT_API_AUTH_STRING: env["PREFECT_API_AUTH_STRING"]}):
        flow_runs, logs, artifacts = anyio.run(prefect_records)
    assert flow_runs and logs
    check("Prefect flow run parameters", repr([r.parameters for r in flow_runs]))
    check("Prefect logs", "\n".join(log.message for log in logs))
    check("Prefect artifacts", repr([(a.key, a.data, a.description) for a in artifacts]))
    assert not found, f"secrets found: {found}"


def test_down_stops_every_server_and_the_dir_stays_authed(authed):
    """Last of the server tests: it stops the module's stack."""
    config, result = authed
    groups = {pid: _group_members(pid) for pid in result.pids.values()}
    assert set(stack.down(config)) == {"s3", "mlflow", "prefect"}
    for pid in groups:
        assert not _group_members(pid), f"process group {pid} still has live members after down"
    after = stack.status(config)
    assert not after.running and after.auth, "status still knows the directory is authenticated"
    assert after.env()["MLFLOW_TRACKING_USERNAME"] == "mergeflow-admin"
