"""Server faults mid-run (issue 34), each with real servers: MLflow SIGKILLed during a run and restarted (same port,
same database), MLflow down for longer than the run waits, the flow's process SIGKILLed during a merge and the
config run again, and (long: MERGEFLOW_LONG_TESTS=1) the Prefect server SIGKILLed and restarted under a served
deployment. Each checks what the run does, that nothing half-written is visible in the store or MLflow, and that a
rerun computes no stage that was stored before the fault (stage work is logged with its Prefect task run)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from stack_faults import sigkill_and_rerun  # noqa: E402
from stack_harness import WORK, mlflow_report, tiny_config  # noqa: E402

pytestmark = pytest.mark.slow
long_test = pytest.mark.skipif(os.environ.get("MERGEFLOW_LONG_TESTS") != "1",
                               reason="takes several minutes: run with MERGEFLOW_LONG_TESTS=1")


def _kill(server) -> None:
    """SIGKILL an MLflow server we started (its process group): it takes over 20 s to obey SIGTERM."""
    if server.process is not None and server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()


@pytest.fixture
def mlflow_server(tmp_path, seaweed, s3_env, monkeypatch):
    from s3_server import MlflowServer

    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", seaweed.endpoint)
    server = MlflowServer(tmp_path, seaweed, s3_env)
    server.start()
    yield server
    _kill(server)


@pytest.fixture
def work_log(monkeypatch) -> list[tuple[str, str]]:
    """(function, Prefect task run) of every stage work call that finished in this process."""
    import importlib

    from prefect.context import TaskRunContext

    done: list[tuple[str, str]] = []
    for module_name, name in WORK.items():
        module = importlib.import_module(module_name)

        def logged(*args, _original=getattr(module, name), _name=name, **kwargs):
            result = _original(*args, **kwargs)
            context = TaskRunContext.get()
            done.append((_name, context.task_run.name if context else "flow"))
            return result

        monkeypatch.setattr(module, name, logged)
    return done


def _kill_at_first_finetune(monkeypatch, server, restart_after: float | None) -> dict[str, float]:
    """SIGKILL `server` when the first expert starts fine-tuning; start it again `restart_after` s later."""
    import mergeflow.families.text.training as training

    times: dict[str, float] = {}
    train = training.finetune_encoder

    def restart() -> None:
        time.sleep(restart_after)
        server.start()
        times["back"] = time.monotonic()

    def killing(*args, **kwargs):
        if "killed" not in times:
            _kill(server)
            times["killed"] = time.monotonic()
            if restart_after is not None:
                threading.Thread(target=restart, daemon=True).start()
        return train(*args, **kwargs)

    monkeypatch.setattr(training, "finetune_encoder", killing)
    return times


def _no_half_written_keys(seaweed, bucket: str) -> list[str]:
    keys = [o["Key"] for o in seaweed.client().list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert not [k for k in keys if ".partial-" in k], keys
    return keys


def test_mlflow_killed_mid_run_is_waited_for_and_every_record_is_written_once(
        tmp_path, seaweed, s3_env, mlflow_server, prefect_harness, monkeypatch):
    from mlflow.tracking import MlflowClient

    import tasks.tracking
    from flows.merge_flow import merge_flow
    from mergeflow.config import load_run_config

    notices: list[str] = []  # the waits' notices (not capfd: Prefect's console handler would keep its closed file)
    monkeypatch.setattr(tasks.tracking, "print", lambda *args, **_: notices.append(" ".join(map(str, args))),
                        raising=False)

    config = load_run_config(tiny_config(tmp_path / "run.yaml", "mlflow-fault", f"s3://{s3_env}/store",
                                         mlflow_server.url, registered_model="mlflow-fault"))
    times = _kill_at_first_finetune(monkeypatch, mlflow_server, restart_after=3.0)
    summary = merge_flow(config)

    assert "back" in times, "the server was not restarted during the run"
    assert any(f"MLflow at {mlflow_server.url} does not answer" in line for line in notices), notices
    assert any("answers again" in line for line in notices), notices
    assert summary["registration"]["version"] == "1"
    report = mlflow_report(mlflow_server.url, "mlflow-fault")
    assert report["open"] == [] and report["duplicated"] == [] and report["pending_models"] == 0, report
    assert [status for status, _ in report["parents"].values()] == ["FINISHED"]
    client = MlflowClient(mlflow_server.url)
    assert len(client.search_model_versions("name = 'mlflow-fault'")) == 1  # no version registered twice
    keys = _no_half_written_keys(seaweed, s3_env)
    prefix = summary["merged"]["task_arithmetic"]["uri"].split(f"s3://{s3_env}/", 1)[1]
    assert f"{prefix}/mergeflow.json" in keys


def test_mlflow_down_past_the_wait_fails_in_one_line_and_a_rerun_recomputes_nothing(
        tmp_path, seaweed, s3_env, mlflow_server, prefect_harness, monkeypatch, work_log):
    from flows.merge_flow import merge_flow
    from mergeflow.config import load_run_config
    from tasks.tracking import TrackingUnavailable

    config = load_run_config(tiny_config(tmp_path / "run.yaml", "mlflow-outage", f"s3://{s3_env}/store",
                                         mlflow_server.url))
    monkeypatch.setenv("MERGEFLOW_MLFLOW_WAIT", "3")
    times = _kill_at_first_finetune(monkeypatch, mlflow_server, restart_after=None)
    with pytest.raises(TrackingUnavailable) as failure:
        merge_flow(config)
    took = time.monotonic() - times["killed"]
    message = str(failure.value)
    assert "\n" not in message and f"MLflow at {mlflow_server.url} did not answer" in message, message
    assert "MERGEFLOW_MLFLOW_WAIT" in message and took < 120, (took, message)

    first = set(work_log)
    work_log.clear()
    mlflow_server.start()
    summary = merge_flow(config)
    assert not first & set(work_log), f"recomputed after the outage: {first & set(work_log)}"
    assert ("merge_pool", "merge-task_arithmetic") in first | set(work_log)

    report = mlflow_report(mlflow_server.url, "mlflow-outage")
    assert report["open"] == [] and report["duplicated"] == [], report
    parents = report["parents"]
    assert parents[summary["mlflow_run_id"]][0] == "FINISHED"
    (old_status, why), = [value for run_id, value in parents.items() if run_id != summary["mlflow_run_id"]]
    assert old_status == "FAILED" and why.startswith("abandoned: its Prefect flow run") and "Failed" in why, why
    _no_half_written_keys(seaweed, s3_env)


def test_flow_sigkilled_mid_merge_leaves_nothing_visible_and_the_rerun_resumes(tmp_path, prefect_harness):
    import anyio
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    store, tracking = tmp_path / "store", f"sqlite:///{tmp_path}/mlflow.db"
    config = tiny_config(tmp_path / "sigkill.yaml", "sigkill", str(store), tracking,
                         merges=[{"method": "task_arithmetic"}, {"method": "doge_ta", "params": {"steps": 100}}])
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path / "prefect")}
    result = sigkill_and_rerun(config, tmp_path, env, "merge-doge_ta")

    assert result["code"] == 0, result["log"].read_text()[-3000:]
    assert not result["recomputed"], f"stored before the kill, computed again: {result['recomputed']}"
    rerun = set(result["rerun"])
    assert ("merge_pool", "merge-doge_ta") in rerun and ("merge_pool", "merge-task_arithmetic") not in rerun
    assert not {fn for fn, _ in rerun} & {"finetune_encoder", "fit_linear_probe"}
    merged = [d for d in (store / "merged" / "sigkill").iterdir() if not d.name.startswith(".")]
    assert len(merged) == 2 and all((d / "mergeflow.json").is_file() for d in merged)  # only whole outputs visible
    assert not list(store.rglob("*.partial-*")), "the killed merge's staging folder outlived the rerun"

    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("sigkill").experiment_id], max_results=1000)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    old = [r for r in runs if r.data.tags.get("mergeflow.stage") == "flow" and r.info.status == "FAILED"]
    assert len(old) == 1 and "abandoned: its process" in old[0].data.tags["mergeflow.error"]

    async def state(flow_run_id):
        async with get_client() as prefect:
            return (await prefect.read_flow_run(flow_run_id)).state

    assert anyio.run(state, old[0].data.tags["prefect.flow_run_id"]).is_crashed()


@long_test
@pytest.mark.parametrize("down", [10.0, 75.0])
def test_prefect_server_restarted_under_serve_loses_no_run(tmp_path, down):
    """Beyond ~60 s down, Prefect's default client retries give up and the in-flight run fails (before
    tasks.runners.patient_prefect_client)."""
    from stack_harness import Stack
    from stack_load import fault_prefect_restart

    stack = Stack(tmp_path / "stack")
    try:
        stack.up()
        row = fault_prefect_restart(stack, tmp_path, down)
    finally:
        stack.down()
    assert row["ok"] and row["lost"] == "none", row
