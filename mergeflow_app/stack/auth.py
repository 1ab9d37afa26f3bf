"""`mergeflow stack up --auth`: the secrets of an authenticated stack, the files and environment that hand them to
the servers, and the environment that hands them to clients.

The choice is remembered in the state directory: `STATE/auth.json` (mode 0600) holds the generated secrets and
marks the directory as authenticated; once there, every later `up` of that directory starts with authentication.
Secrets reach the servers through environment variables (readable by the owner only, in `/proc/PID/environ`) or
files of mode 0600, never through a command line:

- Prefect: `PREFECT_SERVER_API_AUTH_STRING` (server), `PREFECT_API_AUTH_STRING` (clients);
- MLflow: the basic-auth app, its ini (`STATE/auth/mlflow-auth.ini`, no password in it) and user database
  (`STATE/mlflow-auth.db`); the admin is created from `MLFLOW_AUTH_ADMIN_PASSWORD`, a read-only viewer by `up`
  (`MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD` for clients);
- SeaweedFS: S3 identities in `STATE/auth/s3.json` (the runs' key pair of `credentials.json`: read-write; a
  viewer's: read and list); anonymous requests are refused. Its own ports (every gRPC port, the master's, volume
  server's and filer's HTTP ports) require the stack's client certificate (mutual TLS, `STATE/security.toml`,
  see `tls`), and JWT keys (`WEED_JWT_*`) also make the filer and the volume server refuse requests the cluster
  did not sign. It runs as `weed server` (see `control`), not `weed mini`: no admin server, whose `/metrics` mini
  serves to anyone.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field, fields
from importlib.util import find_spec
from pathlib import Path

from mergeflow_app.stack.config import Credentials, StackConfig, StackError, ensure_dir, write_private

AUTH_ENV = "MERGEFLOW_STACK_AUTH"
AUTH_FILE = "auth.json"
READ_ONLY_USERS_ENV = "MERGEFLOW_MLFLOW_READ_ONLY_USERS"  # read by the MLflow gate (mlflow_plugin/)
GATE_DIR = Path(__file__).resolve().parent / "mlflow_plugin"
GATE_FUNCTION = "mergeflow_mlflow_gate:authenticate"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
RUNS_ACTIONS = ["Admin", "Read", "Write", "List", "Tagging"]
VIEWER_ACTIONS = ["Read", "List"]


@dataclass(frozen=True)
class StackSecrets:
    """Everything an authenticated stack generates once (its repr shows no secret)."""

    prefect_auth_string: str = field(repr=False)  # "user:password", Prefect's basic-auth form
    mlflow_admin_user: str
    mlflow_admin_password: str = field(repr=False)
    mlflow_viewer_user: str
    mlflow_viewer_password: str = field(repr=False)
    mlflow_flask_secret: str = field(repr=False)  # signs MLflow's CSRF tokens
    s3_viewer_key: str
    s3_viewer_secret: str = field(repr=False)
    jwt_volume_write: str = field(repr=False)
    jwt_volume_read: str = field(repr=False)
    jwt_filer_write: str = field(repr=False)
    jwt_filer_read: str = field(repr=False)

    @classmethod
    def generate(cls) -> StackSecrets:
        token = lambda: secrets.token_urlsafe(32)  # noqa: E731 - 43 characters, URL- and JSON-safe
        return cls(f"mergeflow:{token()}", "mergeflow-admin", token(), "mergeflow-viewer", token(), token(),
                   f"mergeflow-viewer-{secrets.token_hex(6)}", token(), token(), token(), token(), token())

    def values(self) -> list[str]:
        """Every secret value (what must never reach a command line, a log or a record)."""
        return [getattr(self, f.name) for f in fields(self) if not f.repr]


def auth_path(config: StackConfig) -> Path:
    return auth_path_of(config.state_dir)


def auth_path_of(state_dir: Path) -> Path:
    return state_dir / AUTH_FILE


def server_dir(config: StackConfig) -> Path:
    return config.state_dir / "auth"


def mlflow_auth_db(config: StackConfig) -> Path:
    return config.state_dir / "mlflow-auth.db"


def remembered(config: StackConfig) -> bool:
    """This state directory was set up with authentication."""
    return auth_path(config).exists()


def requested_by_env() -> bool | None:
    """`MERGEFLOW_STACK_AUTH`: True (1/true/yes/on), False (0/false/no/off), None when unset or empty."""
    raw = os.environ.get(AUTH_ENV, "").strip().lower()
    if not raw:
        return None
    if raw in _TRUE or raw in _FALSE:
        return raw in _TRUE
    raise StackError(f"{AUTH_ENV}={raw!r}: expected 1 or 0 (true/false, yes/no, on/off)")


def wanted(config: StackConfig, flag: bool | None) -> bool:
    """Whether `up` starts with authentication: `--auth`, else `MERGEFLOW_STACK_AUTH`, else what the state
    directory remembers. A directory set up with authentication is never started open again."""
    requested = flag if flag is not None else requested_by_env()
    if remembered(config):
        if requested is False:
            raise StackError(f"{auth_path(config)}: this state directory was set up with authentication and "
                             f"stays so ({AUTH_ENV}=0 refused); use another --state-dir for an open stack")
        return True
    return bool(requested)


def resolve_secrets(config: StackConfig, create: bool = True) -> StackSecrets | None:
    """The stack's secrets from `STATE/auth.json`, generated there once (mode 0600) when `create` is true."""
    path = auth_path(config)
    if path.exists():
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        try:
            data = json.loads(path.read_text())
            return StackSecrets(**{f.name: str(data[f.name]) for f in fields(StackSecrets)})
        except (ValueError, KeyError, TypeError) as exc:
            raise StackError(f"{path}: unreadable secrets file (missing or bad field: {exc}); restore it, or "
                             f"delete it together with {mlflow_auth_db(config)} to generate new ones") from exc
    if not create:
        return None
    if mlflow_auth_db(config).exists():
        raise StackError(f"{mlflow_auth_db(config)} exists but {path} does not: MLflow's users were created with "
                         "secrets that are gone; delete the database to create them anew")
    ensure_dir(config.state_dir)
    generated = StackSecrets.generate()
    write_private(path, json.dumps({"enabled": True, **asdict(generated)}, indent=2) + "\n")
    return generated


def check_installed() -> None:
    """MLflow's basic-auth app needs Flask-WTF (the `mlflow[auth]` extra): fail before anything starts."""
    if find_spec("flask_wtf") is None:
        raise StackError("MLflow's basic-auth app needs the Flask-WTF package, which this environment lacks: "
                         "pip install 'mlflow[auth]' (or Flask-WTF) and run `mergeflow stack up --auth` again")


def write_server_files(config: StackConfig, stack_secrets: StackSecrets, credentials: Credentials) -> None:
    """The S3 identities (runs: read-write; viewer: read and list; no anonymous identity, so anonymous requests
    are refused), SeaweedFS's certificates and security.toml (`tls`) and MLflow's auth ini (no password: the
    admin's comes through the environment)."""
    directory = server_dir(config)
    ensure_dir(directory)
    identities = {"identities": [
        {"name": "mergeflow-runs", "actions": RUNS_ACTIONS,
         "credentials": [{"accessKey": credentials.access_key_id, "secretKey": credentials.secret_access_key}]},
        {"name": "mergeflow-viewer", "actions": VIEWER_ACTIONS,
         "credentials": [{"accessKey": stack_secrets.s3_viewer_key, "secretKey": stack_secrets.s3_viewer_secret}]},
    ]}
    write_private(directory / "s3.json", json.dumps(identities, indent=2) + "\n")
    from mergeflow_app.stack import tls  # not at import: `python -m mergeflow_app.stack.tls` runs it as a script

    tls.write_security_file(config)
    write_private(directory / "mlflow-auth.ini", "\n".join([
        "[mlflow]", "default_permission = READ", f"database_uri = sqlite:///{mlflow_auth_db(config)}",
        f"admin_username = {stack_secrets.mlflow_admin_user}", f"authorization_function = {GATE_FUNCTION}",
        "grant_default_workspace_access = false",
        # a verified password is remembered for a minute (one worker: the HTTP APIs' changes apply at once), so
        # a request is not checked by a fresh PBKDF2 hash for every one of MLflow's several permission checks
        "auth_cache_ttl_seconds = 60", ""]))


def server_environment(service: str, config: StackConfig, stack_secrets: StackSecrets) -> dict[str, str]:
    """What a server's environment gains with authentication on."""
    if service == "s3":  # and, as `weed mini` sets for itself, one volume grown at a time (not 7) per bucket
        growth = {f"WEED_MASTER_VOLUME_GROWTH_COPY_{n}": "1" for n in ("1", "2", "3", "OTHER")}
        return {**growth, "WEED_JWT_SIGNING_KEY": stack_secrets.jwt_volume_write,
                "WEED_JWT_SIGNING_READ_KEY": stack_secrets.jwt_volume_read,
                "WEED_JWT_FILER_SIGNING_KEY": stack_secrets.jwt_filer_write,
                "WEED_JWT_FILER_SIGNING_READ_KEY": stack_secrets.jwt_filer_read}
    if service == "mlflow":
        python_path = os.pathsep.join(filter(None, [str(GATE_DIR), os.environ.get("PYTHONPATH")]))
        return {"MLFLOW_AUTH_CONFIG_PATH": str(server_dir(config) / "mlflow-auth.ini"),
                "MLFLOW_AUTH_ADMIN_PASSWORD": stack_secrets.mlflow_admin_password,
                "MLFLOW_FLASK_SERVER_SECRET_KEY": stack_secrets.mlflow_flask_secret,
                "MLFLOW_BASIC_AUTH_FAIL_CLOSED": "true",
                READ_ONLY_USERS_ENV: stack_secrets.mlflow_viewer_user, "PYTHONPATH": python_path}
    return {"PREFECT_SERVER_API_AUTH_STRING": stack_secrets.prefect_auth_string}


def command_flags(service: str, config: StackConfig) -> list[str]:
    """Extra command-line flags of a server with authentication on (paths only, never a secret)."""
    if service == "s3":
        return [f"-s3.config={server_dir(config) / 's3.json'}"]
    if service == "mlflow":
        return ["--app-name", "basic-auth"]
    return []


def client_env(stack_secrets: StackSecrets, viewer: bool = False) -> dict[str, str]:
    """The credentials a client exports: the runs' (Prefect, the MLflow admin) or the read-only viewer's (MLflow
    reader; Prefect has one shared auth string and no read-only role, so a viewer gets none)."""
    if viewer:
        return {"MLFLOW_TRACKING_USERNAME": stack_secrets.mlflow_viewer_user,
                "MLFLOW_TRACKING_PASSWORD": stack_secrets.mlflow_viewer_password}
    return {"PREFECT_API_AUTH_STRING": stack_secrets.prefect_auth_string,
            "MLFLOW_TRACKING_USERNAME": stack_secrets.mlflow_admin_user,
            "MLFLOW_TRACKING_PASSWORD": stack_secrets.mlflow_admin_password}


def redact(text: str, stack_secrets: StackSecrets | None, credentials: Credentials | None = None) -> str:
    """`text` with every secret replaced by `***` (for error messages that quote a server)."""
    hidden = (stack_secrets.values() if stack_secrets else []) + (
        [credentials.secret_access_key] if credentials else [])
    for value in hidden:
        text = text.replace(value, "***")
    return text


def ensure_mlflow_viewer(url: str, stack_secrets: StackSecrets) -> None:
    """Create MLflow's read-only viewer (or reset its password to the stored one) as the admin."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    token = base64.b64encode(f"{stack_secrets.mlflow_admin_user}:{stack_secrets.mlflow_admin_password}"
                             .encode()).decode()
    user = {"username": stack_secrets.mlflow_viewer_user, "password": stack_secrets.mlflow_viewer_password}

    def call(path: str, method: str) -> tuple[int, str]:
        request = urllib.request.Request(f"{url}/api/2.0/mlflow/users/{path}", json.dumps(user).encode(),
                                         {"Content-Type": "application/json", "Authorization": f"Basic {token}"},
                                         method=method)
        try:
            with opener.open(request, timeout=30) as response:
                return response.status, ""
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(300).decode(errors="replace")
        except OSError as exc:
            return 0, str(exc)

    status, body = call("create", "POST")
    if status == 400 and "RESOURCE_ALREADY_EXISTS" in body:
        status, body = call("update-password", "PATCH")
    if status != 200:
        hint = (" (401: the server does not take auth.json's admin password; its users were made with other "
                "secrets: stop the stack, delete mlflow-auth.db in the state directory, start again)"
                if status == 401 else "")
        raise StackError(f"mlflow: could not set up the read-only user {stack_secrets.mlflow_viewer_user!r} "
                         f"(HTTP {status}: {redact(body, stack_secrets)}){hint}")
