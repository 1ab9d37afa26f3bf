"""Cancel, as the Prefect UI's button does it, stops a served deployment's run within 10 s in the middle of a long
merge (DOGE TA): the flow run ends Cancelled, its MLflow run KILLED. A real Prefect server, a real `mergeflow serve`
and its flow-run subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_cancel_through_the_api_stops_a_served_run_in_a_merge(tmp_path):
    import anyio
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelling

    from mergeflow_app.prefect_server import TemporaryPrefectServer

    server = TemporaryPrefectServer(tmp_path / "prefect-server", tmp_path / "prefect-server.log")
    server.start(timeout=300)
    serve = None
    try:
        raw = {
            "name": "served-cancel", "tasks": [{"name": "election"}, {"name": "rotten_tomatoes"}],
            "data": {"probe_per_class": 2, "train": 8, "validation": 4, "test": 8},
            "finetune": {"steps": 2, "batch_size": 4, "max_length": 16, "warmup_steps": 1},
            "evaluation": {"max_length": 16}, "merges": [{"method": "doge_ta", "params": {"steps": 100000}}],
            "storage": {"root": str(tmp_path / "store"), "cache_dir": str(tmp_path / "cache")},
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "served-cancel"},
            "device": "cpu",
        }
        (tmp_path / "served.yaml").write_text(yaml.safe_dump(raw))
        log = tmp_path / "serve.log"
        env = {**os.environ, "PREFECT_API_URL": server.api_url, "PREFECT_HOME": str(tmp_path / "prefect-client"),
               "OMP_NUM_THREADS": "1"}
        serve = subprocess.Popen([sys.executable, "-m", "mergeflow_app.cli", "serve", str(tmp_path / "served.yaml"),
                                  "--name", "canceltest", "--cron", ""], cwd=ROOT, env=env,
                                 stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            async def read(flow_run_id=None):
                async with get_client() as client:
                    if flow_run_id is None:
                        return await client.read_deployment_by_name("mergeflow-merge/canceltest")
                    return await client.read_flow_run(flow_run_id)

            async def cancel(flow_run_id):
                async with get_client() as client:
                    await client.set_flow_run_state(flow_run_id, Cancelling(), force=True)

            deadline = time.monotonic() + 180
            while True:
                try:
                    anyio.run(read)
                    break
                except Exception:  # noqa: BLE001 - not registered yet
                    assert serve.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                    time.sleep(1)
            run = run_deployment("mergeflow-merge/canceltest", timeout=0)
            deadline = time.monotonic() + 600
            while "start merge-doge_ta" not in log.read_text(errors="replace"):
                assert time.monotonic() < deadline and serve.poll() is None, log.read_text()[-4000:]
                time.sleep(0.5)
            time.sleep(2)
            pressed = time.monotonic()
            anyio.run(cancel, run.id)
            while not anyio.run(read, run.id).state.is_final():
                assert time.monotonic() - pressed < 60, log.read_text()[-4000:]
                time.sleep(0.25)
            took = time.monotonic() - pressed
            state = anyio.run(read, run.id).state
        text = log.read_text(errors="replace")
        assert state.is_cancelled(), (state, text[-4000:])
        assert took <= 10, f"cancelled after {took:.1f} s:\n{text[-4000:]}"
        assert "stop  merge-doge_ta" in text, text[-4000:]
        client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        runs = client.search_runs([client.get_experiment_by_name("served-cancel").experiment_id])
        parent = next(r for r in runs if r.data.tags.get("mergeflow.stage") == "flow")
        assert parent.info.status == "KILLED"
        assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
        assert not [p for p in (tmp_path / "store").rglob("*") if ".partial-" in p.name]
    finally:
        if serve is not None and serve.poll() is None:
            os.killpg(serve.pid, signal.SIGTERM)
            serve.wait(timeout=30)
        server.stop()
