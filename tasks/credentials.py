"""S3 credentials from a Prefect block: `storage.credentials_block` names a `mergeflow-s3-credentials` block, and
every task that touches storage loads it and builds its store with it (`store_for`) before its work, so the key pair lives in Prefect's block store only: never in a config, a flow parameter, a log or MLflow.

Create one from Python (`S3Credentials(aws_access_key_id=..., aws_secret_access_key=...).save("my-s3")`) or in the
Prefect UI (Blocks -> Mergeflow S3 Credentials) after `prefect block register -m tasks.credentials`.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from mergeflow import stopping
from mergeflow.buffers import release_freed_memory
from mergeflow.config import StorageConfig
from mergeflow.stages.store import Store
from tasks import progress

F = TypeVar("F", bound=Callable[..., Any])


class S3Credentials(Block):
    """An S3 key pair for Mergeflow's object store (the endpoint stays in the run config)."""

    _block_type_name = "Mergeflow S3 Credentials"
    _block_type_slug = "mergeflow-s3-credentials"
    _description = "Access key pair for the S3-compatible store Mergeflow reads checkpoints from and writes to."

    aws_access_key_id: str = Field(description="access key id")
    aws_secret_access_key: SecretStr = Field(description="secret access key")
    aws_session_token: SecretStr | None = Field(None, description="session token of temporary credentials")


def block_credentials(storage: StorageConfig) -> dict[str, str] | None:
    """The key pair of `storage.credentials_block` as s3fs keywords (None without a block)."""
    if not storage.credentials_block:
        return None
    block = S3Credentials.load(storage.credentials_block)
    credentials = {"key": block.aws_access_key_id, "secret": block.aws_secret_access_key.get_secret_value()}
    if block.aws_session_token:
        credentials["token"] = block.aws_session_token.get_secret_value()
    return credentials


def store_for(storage: StorageConfig) -> Store:
    """The store a task works in, built once: root, options with the block's key pair, content cache."""
    return Store.of(storage, block_credentials(storage))


@contextlib.contextmanager
def stage_scope(kind: str, name: str) -> Iterator[None]:
    """A stage's run: refuse to start once a stop was requested, let a worker process stop on a forwarded signal,
    and print one line as the stage starts and one as it ends (`tasks.progress`, counted under `kind`)."""
    stopping.install_in_worker()
    stopping.enter_scope(_flow_run_id())
    stopping.check()
    print(progress.CLOCK.started(kind, name))
    start = time.perf_counter()
    outcome = "error"
    try:
        yield
        outcome = "done"
    except stopping.Stopped:
        outcome = "stop"
        raise
    finally:
        release_freed_memory()  # what the stage freed leaves the process's RSS before the next one
        print(progress.CLOCK.finished(kind, name, time.perf_counter() - start, outcome))


def uses_storage(fn: F) -> F:
    """A stage's entry (put it under `@task`): its body runs in `stage_scope`, counted under its name."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with stage_scope(fn.__name__, _task_run_name(fn.__name__)):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _flow_run_id() -> str:
    from prefect import runtime

    try:
        return str(runtime.flow_run.id or "")
    except Exception:  # noqa: BLE001 - outside a flow run
        return ""


def _task_run_name(default: str) -> str:
    from prefect import runtime

    try:
        return runtime.task_run.name or default
    except Exception:  # noqa: BLE001 - outside a task run (a direct call in a test)
        return default
