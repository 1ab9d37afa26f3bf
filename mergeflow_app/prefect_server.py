"""The Prefect API a command's flow runs talk to: the configured one (`PREFECT_API_URL`, e.g. from `mergeflow stack
env`), checked before any work, or a temporary local server started for the command and stopped with it.

Prefect's own temporary server waits 20 s for start-up, which a busy machine overruns (the database migrations
alone can take longer). This one waits up to `MERGEFLOW_PREFECT_STARTUP_TIMEOUT` seconds (default 300), says so
while it waits, writes the server's output to a log file, runs in its own session (a terminal's Ctrl-C reaches the
run, which still needs the API to record its end, not the server) and dies with the command even on SIGKILL.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path

from mergeflow import env, stopping
from mergeflow.errors import MergeflowError
from mergeflow_app.stack.processes import stop_group

DEFAULT_STARTUP_TIMEOUT = 300.0
NOTICE_EVERY = 15.0
LOST_SERVER_GRACE = 20.0  # seconds a run may take to end after its Prefect server was lost
LOST_WAIT_ENV = "MERGEFLOW_PREFECT_WAIT"
DEFAULT_LOST_WAIT = 300.0  # seconds a server the command did not start may not answer before the run stops
EXIT_LOST_SERVER = 75  # EX_TEMPFAIL: the command may succeed when run again


class PrefectServerError(MergeflowError):
    """The Prefect API is configured but does not answer, or the temporary server did not come up."""


def startup_timeout() -> float:
    return env.seconds("MERGEFLOW_PREFECT_STARTUP_TIMEOUT", DEFAULT_STARTUP_TIMEOUT)


def _healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _configured_api_url() -> str | None:
    """PREFECT_API_URL from the environment or the active Prefect profile."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def _die_with_parent() -> None:
    """In the server's process, before exec: receive SIGTERM when the command's process dies (Linux)."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def lost_server(what: str, done: threading.Event) -> None:
    """Stop the run, which cannot go on without its Prefect server, and end the command if it has not ended
    (`done` set) `LOST_SERVER_GRACE` seconds later: Prefect's client would otherwise retry the lost API for minutes."""
    print(f"\nmergeflow: {what}. Stopping.", file=sys.stderr, flush=True)
    stopping.request_stop("the Prefect server was lost")
    if not done.wait(LOST_SERVER_GRACE):
        print(f"mergeflow: the run could not end without its Prefect server within {LOST_SERVER_GRACE:.0f} s; "
              "exiting. Nothing is half-written; run the command again to resume.", file=sys.stderr, flush=True)
        os._exit(EXIT_LOST_SERVER)


def lost_server_wait() -> float:
    return env.seconds(LOST_WAIT_ENV, DEFAULT_LOST_WAIT)


def watch_external(api_url: str, wait: float, done: threading.Event, poll: float = 2.0) -> None:
    """While the command runs on a Prefect server it did not start: one that does not answer for `wait` seconds
    (a restart within it is waited out, as the flow's client retries) stops the run (`lost_server`)."""
    since = None
    while not done.wait(poll):
        if _healthy(api_url):
            since = None
            continue
        now = time.monotonic()
        since = now if since is None else since
        if now - since >= wait:
            lost_server(f"the Prefect server at {api_url} has not answered for {now - since:.0f} s (wait longer with "
                        f"{LOST_WAIT_ENV}=<seconds>); when it is back, run the command again to resume", done)
            return


class TemporaryPrefectServer:
    """A Prefect API server (no UI) on a free 127.0.0.1 port, its database under PREFECT_HOME."""

    def __init__(self, home: Path, log_path: Path) -> None:
        self.home, self.log_path = home, log_path
        self.port = _free_port()
        self.process: subprocess.Popen | None = None
        self._stopping = threading.Event()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self, timeout: float, say=print, meanwhile=None) -> None:
        """Launch the server, run `meanwhile()` (e.g. the command's own imports) while it boots, then wait for it."""
        spec = find_spec("prefect")
        if spec is None or spec.origin is None:
            raise PrefectServerError("prefect is not installed in this environment (run `make install`)")
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PREFECT_HOME": str(self.home), "PREFECT_UI_ENABLED": "0",
               "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        env.pop("PREFECT_API_URL", None)
        command = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(spec.origin).parent.parent), "--factory",
                   "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                   "--log-level", "error", "--lifespan", "on"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        say(f"Starting a temporary Prefect server for this command (log: {self.log_path}); on a busy machine "
            f"this can take a minute (waiting up to {timeout:.0f} s).")
        started = time.monotonic()
        if meanwhile is not None:
            try:
                meanwhile()
            except BaseException:
                self.stop()
                raise
        next_notice = started + NOTICE_EVERY
        while True:
            if _healthy(self.api_url):
                say(f"Prefect server ready after {time.monotonic() - started:.0f} s.")
                threading.Thread(target=self._watch, args=(self.process,), name="mergeflow-prefect-watchdog",
                                 daemon=True).start()
                return
            code = self.process.poll()
            now = time.monotonic()
            if code is not None or now - started > timeout:
                self.stop()
                what = (f"exited with code {code}" if code is not None
                        else f"did not answer within {timeout:.0f} s")
                raise PrefectServerError(
                    f"the temporary Prefect server {what}; its output is in {self.log_path}. Raise the wait with "
                    "MERGEFLOW_PREFECT_STARTUP_TIMEOUT=<seconds>, or start a lasting server with `mergeflow stack "
                    "up` and `eval \"$(mergeflow stack env)\"`")
            if now >= next_notice:
                say(f"  still waiting for the Prefect server ({now - started:.0f} s)...")
                next_notice = now + NOTICE_EVERY
            time.sleep(0.25)

    def _watch(self, process: subprocess.Popen) -> None:
        """While the command runs: a server that dies (killed, out of memory) stops the run, which cannot go on
        without it (`lost_server`)."""
        while not self._stopping.wait(1.0):
            code = process.poll()
            if code is not None:
                lost_server(f"the temporary Prefect server exited (code {code}) during the run; its output is in "
                            f"{self.log_path}", self._stopping)
                return

    def stop(self) -> None:
        """Stop the server and wait for it (its whole process group), killing it after 10 s."""
        self._stopping.set()
        process, self.process = self.process, None
        stop_group(process, timeout=10)


def _drain_prefect_workers(timeout: float = 10.0) -> None:
    """Send the run's queued logs and events before the server goes (else Prefect retries them at exit)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=timeout)
        except Exception:  # noqa: BLE001 - a worker that never started has nothing to send
            pass


def _refresh_prefect_settings() -> None:
    """Rebuild Prefect's global settings from the environment: Prefect reads them once at import, and a thread
    that runs outside any settings context (a process pool's message forwarder) sees only those."""
    from prefect import context

    refresh = getattr(context, "refresh_global_settings_context", None)
    if refresh is not None:
        refresh()


@contextmanager
def prefect_api(say=print, meanwhile=None) -> Iterator[str]:
    """The API URL flow runs of this block use: the configured one after a health check, or a temporary server's
    (PREFECT_API_URL is set for the block, so Prefect and any worker process it starts use it). `meanwhile()` runs
    while a temporary server starts (the command's heavy imports overlap its boot)."""
    import flows  # noqa: F401 - sets PREFECT_HOME (the project's .prefect/) before Prefect reads its settings
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = _configured_api_url()
    if configured:
        deadline = time.monotonic() + 15
        while not _healthy(configured):
            if time.monotonic() > deadline:
                raise PrefectServerError(f"PREFECT_API_URL={configured} does not answer; start it (`mergeflow stack "
                                         "up`) or unset PREFECT_API_URL to run with a temporary server")
            time.sleep(0.5)
        if meanwhile is not None:
            meanwhile()
        done = threading.Event()
        threading.Thread(target=watch_external, args=(configured, lost_server_wait(), done),
                         name="mergeflow-prefect-watchdog", daemon=True).start()
        try:
            yield configured
        finally:
            done.set()
        return
    home = Path(os.environ.get("PREFECT_HOME") or Path.cwd() / ".prefect")
    server = TemporaryPrefectServer(home, home / "temporary-server.log")
    saved = {key: os.environ.get(key) for key in ("PREFECT_API_URL", "PREFECT_HOME")}
    try:
        # set before the command's imports run (meanwhile): settings read then, in any thread or worker process
        # (a process pool's message-forwarding thread), must already name this server
        os.environ["PREFECT_HOME"] = str(home)
        os.environ["PREFECT_API_URL"] = server.api_url
        _refresh_prefect_settings()  # threads without a settings context (a process pool's forwarder) read these
        server.start(startup_timeout(), say=say, meanwhile=meanwhile)
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        _drain_prefect_workers()
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _refresh_prefect_settings()
