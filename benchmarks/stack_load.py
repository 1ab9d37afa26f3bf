"""Load on a served deployment (issue 34): N runs triggered at once, as from the Prefect UI (`run_deployment` with
each its own merge coefficient), on `mergeflow serve --limit L` (L < N; also the deployment's concurrency limit
where the CLI has `--concurrency-limit`), on a fresh `mergeflow stack`. Checks that every run reaches a final
state, none is lost or duplicated (flow runs counted by deployment, each coefficient once), at most L ran at once
(from the runs' state timestamps), and the store and MLflow hold exactly the expected records; prints throughput,
queueing delay (scheduled -> running) and peak memory (the machine's, from /proc/meminfo, and the serve process
tree's RSS). Exit status 1 when an invariant fails. Also the served-deployment fault of stack_faults.py (the
Prefect server restarted under serve), beside the helpers it shares with the load.

    .venv/bin/python benchmarks/stack_load.py              # N=10, L=3
    .venv/bin/python benchmarks/stack_load.py --runs 20 --limit 4
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack_harness import (EXE, Stack, kill_group, losses, mlflow_report, run_env, start, store_report,  # noqa: E402
                          tiny_config, wait_line)


class Served:
    """`mergeflow serve CONFIG --name NAME` on a stack (its Prefect API for this process too): trigger runs, read
    them back."""

    def __init__(self, config: Path, name: str, env: dict[str, str], workdir: Path, *args: str) -> None:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        self.name, self.deployment = name, f"mergeflow-merge/{name}"
        self.log = workdir / f"{name}-serve.log"
        self.process = start([EXE, "serve", str(config), "--name", name, "--cron", "", *args], self.log, env, workdir)
        self._settings = temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]})
        self._settings.__enter__()

    def wait_registered(self, timeout: float = 300) -> None:
        import anyio
        from prefect.client.orchestration import get_client

        async def read() -> Any:
            async with get_client() as client:
                return await client.read_deployment_by_name(self.deployment)

        deadline = time.monotonic() + timeout
        while True:
            try:
                anyio.run(read)
                return
            except Exception:  # noqa: BLE001 - not registered yet
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"serve did not register {self.deployment}; see {self.log}") from None
                time.sleep(1)

    def trigger(self, parameters: dict[str, Any] | None = None) -> Any:
        """A run of the deployment, as the UI's Run button makes it (`parameters` override the config)."""
        from prefect.deployments import run_deployment

        return run_deployment(self.deployment, parameters=parameters, timeout=0)

    def read(self, flow_run_id: Any) -> tuple[Any, int]:
        """A flow run and how many task runs it has recorded."""
        import anyio
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        async def read() -> tuple[Any, int]:
            async with get_client() as client:
                run = await client.read_flow_run(flow_run_id)
                tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
                return run, len(tasks)

        return anyio.run(read)

    def runs(self) -> list[tuple[Any, list[Any]]]:
        """Every flow run of the deployment, with its state history."""
        import anyio
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

        async def read() -> list[tuple[Any, list[Any]]]:
            async with get_client() as client:
                deployment = await client.read_deployment_by_name(self.deployment)
                runs = await client.read_flow_runs(deployment_filter=DeploymentFilter(
                    id=DeploymentFilterId(any_=[deployment.id])), limit=200)
                return [(run, await client.read_flow_run_states(run.id)) for run in runs]

        return anyio.run(read)

    def stop(self) -> None:
        kill_group(self.process, signal.SIGTERM)
        self._settings.__exit__(None, None, None)


def fault_prefect_restart(stack: Stack, workdir: Path, down: float) -> dict[str, Any]:
    """The Prefect server SIGKILLed under `mergeflow serve` while a run fine-tunes, restarted `down` s later;
    then a run triggered with other parameters. Both must complete, and the in-flight run lose no task run."""
    env = run_env(stack, workdir)
    name = f"fault-prefect-{down:.0f}"
    config = tiny_config(workdir / f"{name}.yaml", name, f"s3://mergeflow/{name}", env["MLFLOW_TRACKING_URI"])
    served = Served(config, name, env, workdir)
    try:
        served.wait_registered()
        first = served.trigger()
        wait_line(served.log, "start finetune-expert-", served.process, 900)
        before = served.read(first.id)[1]
        stack.kill("prefect")
        killed = time.monotonic()
        time.sleep(down)
        stack.up()
        back, recovered = time.monotonic(), None
        second = served.trigger({"config": {**yaml.safe_load(config.read_text()),
                                            "merges": [{"method": "task_arithmetic", "params": {"scaling": 0.5}}]}})
        deadline = time.monotonic() + 1200
        while time.monotonic() < deadline:
            (run1, tasks1), (run2, tasks2) = served.read(first.id), served.read(second.id)
            if recovered is None and (tasks1 > before or run1.state.is_final()):
                recovered = time.monotonic() - back  # the in-flight run's progress reaches the server again
            if run1.state.is_final() and run2.state.is_final():
                break
            time.sleep(2)
        alive = served.process.poll() is None
    finally:
        served.stop()
    s1, s2 = run1.state, run2.state
    happens = (f"in-flight run {s1.name}" + ("" if s1.is_completed() else f" ({(s1.message or '')[:90]})")
               + f", run triggered after the restart {s2.name}; serve " + ("stayed up" if alive else "exited"))
    lost = losses(mlflow_report(env["MLFLOW_TRACKING_URI"], name), store_report(env, "mergeflow", f"{name}/"), 2)
    if tasks1 != tasks2:
        lost = f"{lost}; the in-flight run has {tasks1} task runs recorded, a whole run {tasks2}"
    return {"fault": f"Prefect server SIGKILLed under serve, restarted after {down:.0f} s (down {back - killed:.0f} s)",
            "happens": happens, "recover_s": recovered, "lost": lost,
            "ok": s1.is_completed() and s2.is_completed() and alive}


class MemorySampler(threading.Thread):
    """Peak machine memory in use (MemTotal - MemAvailable) and peak RSS of a process tree, every 0.5 s."""

    def __init__(self, root_pid: int) -> None:
        super().__init__(daemon=True)
        self.root, self.stopped = root_pid, threading.Event()
        self.baseline = self.peak_used = self._used()
        self.peak_tree = 0

    @staticmethod
    def _used() -> int:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return (int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])) * 1024

    def _tree_rss(self) -> int:
        children: dict[int, list[int]] = {}
        rss: dict[int, int] = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    status = Path(f"/proc/{entry.name}/status").read_text()
                except OSError:
                    continue
                fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
                pid = int(entry.name)
                children.setdefault(int(fields["PPid"]), []).append(pid)
                rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
        total, todo = 0, [self.root]
        while todo:
            pid = todo.pop()
            total += rss.get(pid, 0)
            todo.extend(children.get(pid, []))
        return total

    def run(self) -> None:
        while not self.stopped.wait(0.5):
            self.peak_used = max(self.peak_used, self._used())
            self.peak_tree = max(self.peak_tree, self._tree_rss())


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant (an end at t closes before a start at t)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


def supports_concurrency_limit() -> bool:
    out = subprocess.run([EXE, "serve", "--help"], capture_output=True, text=True, timeout=120)
    return "--concurrency-limit" in out.stdout


def run_load(stack: Stack, workdir: Path, runs: int = 10, limit: int = 3, timeout: float = 3600) -> dict[str, Any]:
    """Trigger `runs` runs at once on a deployment served with `limit`; the invariants and the figures."""
    env = run_env(stack, workdir)
    name = f"load-{runs}x{limit}"
    config = tiny_config(workdir / f"{name}.yaml", name, f"s3://mergeflow/{name}", env["MLFLOW_TRACKING_URI"])
    raw = yaml.safe_load(config.read_text())
    extra = ["--limit", str(limit)] + (["--concurrency-limit", str(limit)] if supports_concurrency_limit() else [])
    served = Served(config, name, env, workdir, *extra)
    sampler = MemorySampler(served.process.pid)
    scalings = [round(0.3 + 0.05 * i, 2) for i in range(runs)]
    try:
        served.wait_registered()
        sampler.start()
        triggered_at = time.monotonic()
        created = [served.trigger({"config": {**raw, "merges": [{"method": "task_arithmetic",
                                                                 "params": {"scaling": s}}]}}) for s in scalings]
        trigger_s = time.monotonic() - triggered_at
        deadline = time.monotonic() + timeout
        while True:
            mine = served.runs()
            if all(run.state.is_final() for run, _ in mine) and len(mine) >= runs or time.monotonic() > deadline:
                break
            time.sleep(3)
    finally:
        sampler.stopped.set()
        served.stop()
    return _judge(env, name, runs, limit, scalings, created, mine, trigger_s, sampler)


def _judge(env: dict[str, str], name: str, runs: int, limit: int, scalings: list[float], created: list[Any],
           mine: list[tuple[Any, list[Any]]], trigger_s: float, sampler: MemorySampler) -> dict[str, Any]:
    """The invariants (lost, duplicated, concurrency, store, MLflow) and the figures of a load run."""
    seen = Counter(run.parameters["config"]["merges"][0]["params"]["scaling"] for run, _ in mine)
    intervals, waits = [], []
    for run, states in mine:
        states = sorted(states, key=lambda state: state.timestamp)
        started = [s.timestamp for s in states if s.type.value == "RUNNING"]
        ended = [s.timestamp for s in states if s.is_final()]
        if started and ended:
            intervals.append((started[0].timestamp(), ended[-1].timestamp()))
        scheduled = min([s.timestamp for s in states if s.type.value == "SCHEDULED"] or [run.created])
        if started:
            waits.append((started[0] - scheduled).total_seconds())
    span = (max(end for _, end in intervals) - min(run.created.timestamp() for run, _ in mine)) if intervals else 0
    store = store_report(env, "mergeflow", f"{name}/")
    mlflow = mlflow_report(env["MLFLOW_TRACKING_URI"], name)
    parents = [status for status, _ in mlflow["parents"].values()]
    states = Counter(run.state.type.value for run, _ in mine)
    result = {
        "runs": runs, "limit": limit, "flow_runs": len(mine), "states": dict(states),
        "lost": sorted(set(scalings) - set(seen)), "duplicated": sorted(s for s, n in seen.items() if n > 1),
        "foreign": [run.id for run in created if run.id not in {r.id for r, _ in mine}],
        "max_running": max_overlap(intervals), "wait_median_s": statistics.median(waits) if waits else None,
        "wait_max_s": max(waits) if waits else None, "span_s": span,
        "throughput_per_min": 60 * len(intervals) / span if span else 0.0, "trigger_s": trigger_s,
        "merged_stored": len(store["merged"]), "half_written": store["incomplete"] + store["partial"],
        "mlflow_parents": Counter(parents), "mlflow_open": mlflow["open"], "mlflow_duplicated": mlflow["duplicated"],
        "peak_machine_gb": sampler.peak_used / 1e9, "baseline_machine_gb": sampler.baseline / 1e9,
        "peak_tree_gb": sampler.peak_tree / 1e9,
    }
    result["ok"] = (result["flow_runs"] == runs and not result["lost"] and not result["duplicated"]
                    and states.get("COMPLETED", 0) == runs and result["max_running"] <= limit
                    and result["merged_stored"] == runs and not result["half_written"]
                    and parents.count("FINISHED") == runs and not mlflow["open"] and not mlflow["duplicated"])
    return result


def report(result: dict[str, Any]) -> str:
    r = result
    return "\n".join([
        f"runs triggered: {r['runs']} at once (in {r['trigger_s']:.1f} s), serve limit {r['limit']}",
        f"flow runs of the deployment: {r['flow_runs']}, states {r['states']}; lost {r['lost'] or 'none'}, "
        f"duplicated {r['duplicated'] or 'none'}",
        f"most running at once: {r['max_running']} (limit {r['limit']})",
        f"throughput: {r['throughput_per_min']:.2f} runs/min ({r['runs']} runs in {r['span_s']:.0f} s, first "
        f"scheduled to last finished)",
        f"queueing delay (scheduled -> running): median {r['wait_median_s']:.0f} s, max {r['wait_max_s']:.0f} s",
        f"store: {r['merged_stored']} merged outputs with their manifest (expected {r['runs']}), half-written "
        f"{r['half_written'] or 'none'}",
        f"MLflow: parent runs {dict(r['mlflow_parents'])}, open {r['mlflow_open'] or 'none'}, duplicated "
        f"{r['mlflow_duplicated'] or 'none'}",
        f"peak memory: machine {r['peak_machine_gb']:.2f} GB in use (baseline {r['baseline_machine_gb']:.2f} GB), "
        f"serve process tree RSS {r['peak_tree_gb']:.2f} GB",
        "invariants: " + ("all hold" if r["ok"] else "FAILED")])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="runs triggered at once (default 10)")
    parser.add_argument("--limit", type=int, default=3, help="flow runs served at once (default 3)")
    parser.add_argument("--workdir", help="keep logs and configs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="stack-load-"))
    workdir.mkdir(parents=True, exist_ok=True)
    stack = Stack(workdir / "stack")
    print(f"stack up in {stack.up():.0f} s (state and logs: {workdir})", flush=True)
    try:
        result = run_load(stack, workdir, args.runs, args.limit)
    finally:
        stack.down()
    print(report(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
