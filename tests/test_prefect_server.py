"""The Prefect API of a command-line run: a temporary server that comes up on a machine whose every core is busy,
one clear line (no traceback) when it does not or when the configured API does not answer."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
EXE = shutil.which("mergeflow", path=str(Path(sys.executable).parent)) or "mergeflow"


def _tiny_config(tmp_path: Path) -> Path:
    raw = {
        "name": "busy", "tasks": [{"name": "election"}, {"name": "rotten_tomatoes"}],
        "data": {"probe_per_class": 2, "train": 8, "validation": 4, "test": 8},
        "finetune": {"steps": 2, "batch_size": 4, "max_length": 16, "warmup_steps": 1},
        "evaluation": {"max_length": 16}, "merges": [{"method": "task_arithmetic"}],
        "storage": {"root": str(tmp_path / "store"), "cache_dir": str(tmp_path / "cache")},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "busy"}, "device": "cpu",
    }
    path = tmp_path / "busy.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), **extra}
    if "PREFECT_API_URL" not in extra:
        env.pop("PREFECT_API_URL", None)
    return env


def test_run_passes_with_every_core_busy(tmp_path):
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * (os.cpu_count() or 1))]
    try:
        out = subprocess.run([EXE, "run", str(_tiny_config(tmp_path))], cwd=tmp_path, env=_env(tmp_path),
                             capture_output=True, text=True, timeout=1500)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Starting a temporary Prefect server" in out.stdout and "Prefect server ready after" in out.stdout
    assert "Accuracy (%)" in out.stdout


def test_a_configured_api_that_does_not_answer_is_one_clear_line(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: nothing listens there
    started = time.monotonic()
    out = subprocess.run([EXE, "run", str(_tiny_config(tmp_path))], cwd=tmp_path, capture_output=True, text=True,
                         env=_env(tmp_path, PREFECT_API_URL=f"http://127.0.0.1:{port}/api"), timeout=300)
    assert out.returncode == 2 and time.monotonic() - started < 120
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert f"PREFECT_API_URL=http://127.0.0.1:{port}/api does not answer" in out.stderr
    assert "mergeflow stack up" in out.stderr
    assert not (tmp_path / "store").exists()  # no work started


def test_a_server_that_does_not_come_up_in_time_names_its_log_and_the_setting(tmp_path):
    # a server that hangs before it answers: its process (only it has PREFECT__SERVER_EPHEMERAL=1) sleeps at start
    hang = tmp_path / "hang"
    hang.mkdir()
    (hang / "sitecustomize.py").write_text(
        "import os, time\nif os.environ.get('PREFECT__SERVER_EPHEMERAL') == '1':\n    time.sleep(120)\n")
    path = os.pathsep.join(filter(None, [str(hang), os.environ.get("PYTHONPATH")]))
    out = subprocess.run([EXE, "run", str(_tiny_config(tmp_path))], cwd=tmp_path, capture_output=True, text=True,
                         env=_env(tmp_path, MERGEFLOW_PREFECT_STARTUP_TIMEOUT="5", PYTHONPATH=path), timeout=300)
    log = tmp_path / "prefect" / "temporary-server.log"
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert f"did not answer within 5 s; its output is in {log}" in out.stderr
    assert "MERGEFLOW_PREFECT_STARTUP_TIMEOUT" in out.stderr and log.exists()
    assert not (tmp_path / "store").exists()


def test_an_external_server_lost_mid_run_stops_the_run_and_a_brief_outage_does_not(monkeypatch, capsys):
    """A Prefect server the command did not start that stops answering for the wait stops the run (the flow's client
    would otherwise retry the lost API for ever: a run spun 80 min once) and ends the command after the grace; one
    that answers again in time is waited out."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from mergeflow import stopping
    from mergeflow_app import prefect_server

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200 if self.server.up else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    server.up = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    api = f"http://127.0.0.1:{server.server_address[1]}/api"
    exits: list[int] = []
    monkeypatch.setattr(prefect_server, "LOST_SERVER_GRACE", 0.5)
    monkeypatch.setattr(prefect_server.os, "_exit", exits.append)
    try:
        done = threading.Event()
        watch = threading.Thread(target=prefect_server.watch_external, args=(api, 1.5, done, 0.1))
        watch.start()
        server.up = False  # a restart shorter than the wait
        time.sleep(0.8)
        server.up = True
        time.sleep(2.0)
        assert not stopping.stop_requested() and watch.is_alive() and not exits
        server.up = False  # now for good
        watch.join(timeout=10)
        assert not watch.is_alive()
        assert stopping.stop_requested() and exits == [prefect_server.EXIT_LOST_SERVER]
        err = capsys.readouterr().err
        assert f"the Prefect server at {api} has not answered for" in err and "MERGEFLOW_PREFECT_WAIT" in err, err
        assert "Nothing is half-written" in err
    finally:
        done.set()
        stopping.reset()
        server.shutdown()
