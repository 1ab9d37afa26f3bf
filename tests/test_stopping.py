"""Ctrl-C (SIGINT) and SIGTERM stop a real `mergeflow run` within 10 s in each long stage: the command exits with
128 + the signal, the Prefect flow run ends Cancelled, the MLflow runs end KILLED (none left RUNNING), nothing
half-written is left in the store, no process the command started outlives it, and a rerun resumes fine-tuning
from its last checkpoint. Real MiniLM, real data, a real temporary Prefect server per command."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mergeflow import stopping
from mergeflow.progress import progress_bar

pytestmark = pytest.mark.slow
EXE = shutil.which("mergeflow", path=str(Path(sys.executable).parent)) or "mergeflow"
STOP_WITHIN = 10.0


def test_progress_bar_is_a_stop_point():
    stopping.reset()
    seen = []
    try:
        with pytest.raises(stopping.Stopped, match="stopped: test"):
            for i in progress_bar(range(10), disable=True):
                seen.append(i)
                if i == 3:
                    stopping.request_stop("test")
    finally:
        stopping.reset()
    assert seen == [0, 1, 2, 3]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One store, MLflow database and PREFECT_HOME for the module: experts fine-tuned once are reused."""
    return tmp_path_factory.mktemp("stopping")


def _config(workdir: Path, name: str, merges: list, **overrides) -> Path:
    raw = {
        "name": name,
        "tasks": [{"name": "election"}, {"name": "rotten_tomatoes"}],
        "data": {"probe_per_class": 2, "train": 64, "validation": 100, "test": 600},
        "finetune": {"steps": 40, "batch_size": 8, "max_length": 32, "warmup_steps": 1, "checkpoint_every": 4},
        "evaluation": {"max_length": 32, "batch_size": 8},
        "merges": merges,
        "statistics": {"max_examples": 100, "max_length": 32},
        "storage": {"root": str(workdir / "store"), "cache_dir": str(workdir / "cache")},
        "tracking": {"tracking_uri": f"sqlite:///{workdir}/mlflow.db", "experiment": "stopping"},
        "device": "cpu",
        **overrides,
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _start(workdir: Path, config: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_HOME": str(workdir / "prefect"), "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)
    return subprocess.Popen([EXE, "run", str(config)], cwd=workdir, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait_for(log: Path, pattern: str, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, log.read_text(errors="replace")):
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {pattern!r}:\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"no {pattern!r} within {timeout} s:\n{log.read_text(errors='replace')[-4000:]}")


def _stop(process: subprocess.Popen, signum: int, log: Path) -> float:
    sent = time.monotonic()
    os.kill(process.pid, signum)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"still running 60 s after {signum}:\n{log.read_text(errors='replace')[-4000:]}")
    return time.monotonic() - sent


def _processes_with_home(home: Path) -> list[int]:
    """PIDs of live processes whose environment names this PREFECT_HOME (the command and what it started)."""
    marker = f"PREFECT_HOME={home}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state not in ("Z", "X"):
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def _last_flow_run_state(home: Path) -> str:
    with sqlite3.connect(home / "prefect.db") as db:
        return db.execute("SELECT state_type FROM flow_run ORDER BY created DESC LIMIT 1").fetchone()[0]


def _check_stopped(workdir: Path, log: Path, process: subprocess.Popen, seconds: float, signum: int,
                   stage: str) -> None:
    text = log.read_text(errors="replace")
    assert seconds <= STOP_WITHIN, f"took {seconds:.1f} s to stop:\n{text[-4000:]}"
    assert process.returncode == 128 + signum, text[-4000:]
    assert re.search(rf"stop\s+{stage}", text), f"{stage} was not the stage stopped:\n{text[-4000:]}"
    assert "mergeflow: stopped" in text and "Traceback" not in text, text[-4000:]
    assert _last_flow_run_state(workdir / "prefect") == "CANCELLED"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    experiment = client.get_experiment_by_name("stopping")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    parent = next(r for r in runs if r.data.tags.get("mergeflow.stage") == "flow")
    assert parent.info.status == "KILLED" and "mergeflow.stopped" in parent.data.tags
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    leftovers = [p for p in (workdir / "store").rglob("*") if ".partial-" in p.name or p.name.endswith(".tmp")]
    assert not leftovers, leftovers
    deadline = time.monotonic() + 5
    while _processes_with_home(workdir / "prefect") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_with_home(workdir / "prefect"), "a process of the command outlived it"


def test_ctrl_c_in_fine_tuning_stops_and_the_rerun_resumes(workdir):
    config = _config(workdir, "finetune", [{"method": "task_arithmetic"}])
    log = workdir / "finetune.log"
    process = _start(workdir, config, log)
    _wait_for(log, r"start\s+finetune-expert-election", process)
    checkpoints = workdir / "store" / "checkpoints"
    deadline = time.monotonic() + 300
    while not any(checkpoints.rglob("checkpoint.pt")):
        assert time.monotonic() < deadline and process.poll() is None, log.read_text()[-4000:]
        time.sleep(0.2)
    _check_stopped(workdir, log, process, _stop(process, signal.SIGINT, log), signal.SIGINT,
                   "finetune-expert-election")

    rerun = workdir / "finetune-rerun.log"
    process = _start(workdir, config, rerun)
    assert process.wait(timeout=900) == 0, rerun.read_text()[-4000:]
    reports = [json.loads(p.read_text()) for p in (workdir / "store").rglob("training.json")]
    assert any(r.get("resumed_from", 0) > 0 for r in reports), reports  # resumed from a stored checkpoint
    assert not any((workdir / "store" / "checkpoints").rglob("*.pt"))


@pytest.mark.parametrize("stage,signum,merges,overrides", [
    ("statistics-election", signal.SIGTERM, [{"method": "fisher"}], {}),
    ("merge-doge_ta", signal.SIGINT, [{"method": "doge_ta", "params": {"steps": 100000}}], {}),
    ("merge-doge_ta", signal.SIGTERM, [{"method": "doge_ta", "params": {"steps": 100000}}],
     {"task_runner": "processes", "max_workers": 2}),
    ("merge-doge_ta", signal.SIGINT, [{"method": "doge_ta", "params": {"steps": 100000}}],
     {"task_runner": "dask", "max_workers": 2}),
    ("merge-adamerging", signal.SIGTERM, [{"method": "adamerging", "params": {"steps": 100000}}], {}),
    ("sweep-task_arithmetic-tuned-0", signal.SIGINT,
     [{"method": "task_arithmetic", "sweep": {"scaling": [0.1 * i for i in range(1, 11)]}}],
     {"tuning": {"max_examples": 100}}),
    ("evaluate-average", signal.SIGTERM, [{"method": "average"}], {}),
])
def test_a_signal_stops_each_long_stage_within_10_s(workdir, stage, signum, merges, overrides):
    if not any((workdir / "store").rglob("training.json")):
        pytest.fail("needs the experts of test_ctrl_c_in_fine_tuning_stops_and_the_rerun_resumes (run the module)")
    name = stage.split("-")[0] + str(signum) + overrides.get("task_runner", "")
    config = _config(workdir, name, merges, **overrides)
    log = workdir / f"{name}.log"
    process = _start(workdir, config, log)
    _wait_for(log, rf"start\s+{re.escape(stage)}\b", process)
    time.sleep(1.0)
    _check_stopped(workdir, log, process, _stop(process, signum, log), signum, stage)


def test_a_stop_tells_listeners_once_and_a_scoped_stop_spares_other_runs():
    stopping.reset()
    heard = []
    try:
        with stopping.listening(heard.append):
            stopping.request_stop("for run A", scope="A")
            stopping.request_stop("again")  # already stopping: no second notice
            deadline = time.monotonic() + 5
            while not heard and time.monotonic() < deadline:
                time.sleep(0.01)
        assert heard == ["for run A"]
        stopping.enter_scope("A")  # the run it was meant for still stops
        assert stopping.stop_requested()
        stopping.enter_scope("B")  # a long-lived worker's next run starts clean
        assert not stopping.stop_requested()
        stopping.request_stop("unscoped")  # a stop of this process is never forgotten
        stopping.enter_scope("B")
        assert stopping.stop_requested()
    finally:
        stopping.reset()


def test_a_run_whose_prefect_server_dies_ends_instead_of_hanging(workdir):
    """The temporary server killed in the middle of a merge: the command says so, stops the run (MLflow KILLED),
    and exits 75 (try again) within the grace period instead of retrying the lost API for minutes."""
    from mergeflow_app.prefect_server import EXIT_LOST_SERVER, LOST_SERVER_GRACE

    if not any((workdir / "store").rglob("training.json")):
        pytest.fail("needs the experts of test_ctrl_c_in_fine_tuning_stops_and_the_rerun_resumes (run the module)")
    config = _config(workdir, "lostserver", [{"method": "doge_ta", "params": {"steps": 100000}}])
    log = workdir / "lostserver.log"
    process = _start(workdir, config, log)
    _wait_for(log, r"start\s+merge-doge_ta\b", process)
    servers = [pid for pid in _processes_with_home(workdir / "prefect")
               if b"uvicorn" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(servers) == 1, servers
    killed = time.monotonic()
    os.kill(servers[0], signal.SIGKILL)
    try:
        process.wait(timeout=LOST_SERVER_GRACE + 30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"hung after its Prefect server died:\n{log.read_text(errors='replace')[-4000:]}")
    seconds = time.monotonic() - killed
    text = log.read_text(errors="replace")
    assert process.returncode == EXIT_LOST_SERVER and seconds <= LOST_SERVER_GRACE + 10, (seconds, text[-4000:])
    assert "the temporary Prefect server exited" in text, text[-4000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("stopping").experiment_id],
                              order_by=["attributes.start_time DESC"])
    parent = next(r for r in runs if r.data.tags.get("mergeflow.stage") == "flow")
    assert parent.info.run_name == "lostserver" and parent.info.status == "KILLED"
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    assert not [p for p in (workdir / "store").rglob("*") if ".partial-" in p.name or p.name.endswith(".tmp")]
    deadline = time.monotonic() + 5
    while _processes_with_home(workdir / "prefect") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_with_home(workdir / "prefect"), "a process of the command outlived it"
