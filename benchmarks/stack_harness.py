"""What the stack benchmarks and their tests share: a `mergeflow stack` on free ports (`Stack`), tiny run configs,
`mergeflow run` processes started, watched and killed by process group, stage work logged per Prefect task run
(`work_env`: a rerun that computes a stage stored before a fault is seen), and what MLflow and the store hold
afterwards (`mlflow_report`, `store_report`, `losses`). Used by stack_faults.py, stack_load.py, llm_scale.py and
tests/test_faults.py, tests/test_load.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EXE = str(Path(sys.executable).parent / "mergeflow")
WORK = {"mergeflow.families.text.training": "finetune_encoder", "mergeflow.heads": "fit_linear_probe",
        "mergeflow.families.text.evaluation": "score_encoder", "mergeflow.merge": "merge_pool"}
SITE = '''import os
if os.environ.get("MERGEFLOW_WORK_LOG"):
    import functools, importlib
    def _install(module, name):
        original = getattr(module, name)
        @functools.wraps(original)
        def logged(*args, **kwargs):
            result = original(*args, **kwargs)
            from prefect.context import TaskRunContext
            where = TaskRunContext.get().task_run.name if TaskRunContext.get() else "flow"
            with open(os.environ["MERGEFLOW_WORK_LOG"], "a") as log:
                log.write(f"{name}\\t{where}\\n")
            return result
        setattr(module, name, logged)
    for _module, _name in %r.items():
        _install(importlib.import_module(_module), _name)
'''


def tiny_config(path: Path, name: str, root: str, tracking_uri: str, *, merges: list[dict] | None = None,
                registered_model: str | None = None, cache_dir: Path | None = None) -> Path:
    """A run config of a few tens of seconds: two text tasks, 2 fine-tuning steps, tiny splits."""
    raw = {"name": name, "tasks": [{"name": "election"}, {"name": "rotten_tomatoes"}],
           "data": {"probe_per_class": 2, "train": 8, "validation": 4, "test": 8},
           "finetune": {"steps": 2, "batch_size": 4, "max_length": 16, "warmup_steps": 1},
           "evaluation": {"max_length": 16}, "merges": merges or [{"method": "task_arithmetic"}],
           "storage": {"root": root, "cache_dir": str(cache_dir or path.parent / f"cache-{name}")},
           "tracking": {"tracking_uri": tracking_uri, "experiment": name,
                        **({"registered_model": registered_model} if registered_model else {})},
           "device": "cpu"}
    path.write_text(yaml.safe_dump(raw))
    return path


def work_env(workdir: Path, log: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a process whose stage work is logged to `log` (one line per call: function, task run)."""
    site = workdir / "work-site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(SITE % WORK)
    env = dict(base if base is not None else os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), str(ROOT), env.get("PYTHONPATH")]))
    env.update(MERGEFLOW_WORK_LOG=str(log), OMP_NUM_THREADS="1")
    return env


def work_done(log: Path) -> Counter[tuple[str, str]]:
    """(function, task run) -> calls that finished, from a work log."""
    lines = log.read_text().splitlines() if log.exists() else []
    return Counter(tuple(line.split("\t", 1)) for line in lines if "\t" in line)


def start(command: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """A command in its own process group (so that it, and only it, can be killed), output to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)


def finish(config: Path, log: Path, env: dict[str, str], workdir: Path) -> int:
    """`mergeflow run CONFIG` to its end (killed if this process is interrupted); its exit status."""
    run = start([EXE, "run", str(config)], log, env, workdir)
    try:
        return run.wait(timeout=1800)
    finally:
        kill_group(run)


def kill_group(process: subprocess.Popen | None, sig: int = signal.SIGKILL) -> None:
    """Signal a process group we started (by its leader's PID) and reap the leader."""
    from mergeflow_app.stack.processes import stop_group

    stop_group(process, sig, timeout=30)


def wait_line(log: Path, text: str, process: subprocess.Popen | None, timeout: float, after: int = 0) -> float:
    """Wait until `text` appears in `log` (past its first `after` characters); the monotonic time it was seen."""
    deadline = time.monotonic() + timeout
    while True:
        if text in log.read_text(errors="replace")[after:]:
            return time.monotonic()
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"exited (code {process.returncode}) before {text!r}; see {log}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{text!r} not in {log} after {timeout:.0f} s")
        time.sleep(0.1)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


class Stack:
    """`mergeflow stack` on free ports in `state_dir`: up, the environment to use it, and its faults."""

    def __init__(self, state_dir: Path) -> None:
        from mergeflow_app import stack

        self.stack = stack
        self.config = stack.StackConfig(state_dir=state_dir, startup_timeout=300,
                                        **dict(zip(stack.PORTS, free_ports(len(stack.PORTS)))))

    def up(self) -> float:
        """Start what is not running (same ports, data and credentials); seconds until all are healthy."""
        started = time.monotonic()
        self.stack.up(self.config)
        return time.monotonic() - started

    def env(self) -> dict[str, str]:
        return self.stack.status(self.config).env()

    def kill(self, service: str) -> None:
        """SIGKILL a service's whole process group, as a crash or the OOM killer would."""
        from mergeflow_app.stack.processes import spawned

        pid = self.stack.status(self.config).services[service].pid
        os.killpg(pid, signal.SIGKILL)
        if pid in spawned:
            spawned[pid].wait()

    def down(self) -> None:
        self.stack.down(self.config)


def mlflow_report(url: str, experiment: str) -> dict[str, Any]:
    """Open runs, duplicated child runs (a name twice under one parent) and unfinished logged models."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=1000) if found else []
    children = Counter((r.data.tags.get("mlflow.parentRunId"), r.info.run_name) for r in runs
                       if r.data.tags.get("mlflow.parentRunId"))
    models = client.search_logged_models([found.experiment_id]) if found else []
    parents = [r for r in runs if r.data.tags.get("mergeflow.stage") == "flow"]
    return {"runs": len(runs), "open": sorted(r.info.run_name for r in runs if r.info.status == "RUNNING"),
            "duplicated": sorted(name for (_, name), n in children.items() if n > 1),
            "pending_models": sum("PENDING" in str(m.status) for m in models),
            "parents": {r.info.run_id: (r.info.status, r.data.tags.get("mergeflow.error", "")) for r in parents}}


def store_report(env: dict[str, str], bucket: str, prefix: str) -> dict[str, Any]:
    """The store's keys under `prefix`: merged outputs with their manifest, and temporary (.partial-) keys."""
    import boto3

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])]
    merged = sorted({k.rsplit("/", 1)[0] for k in keys if "/merged/" in k and k.endswith("/mergeflow.json")})
    incomplete = sorted({k.rsplit("/", 1)[0] for k in keys if "/merged/" in k} - set(merged))
    return {"keys": len(keys), "merged": merged, "incomplete": incomplete,
            "partial": [k for k in keys if ".partial-" in k]}


def losses(mlflow: dict[str, Any], store: dict[str, Any], expect_merged: int) -> str:
    """What a fault left behind or lost, in words ("none" is the goal)."""
    problems = [(mlflow["open"], f"MLflow runs left RUNNING: {mlflow['open']}"),
                (mlflow["duplicated"], f"duplicated MLflow runs: {mlflow['duplicated']}"),
                (mlflow["pending_models"], f"{mlflow['pending_models']} logged models left PENDING"),
                (len(store["merged"]) != expect_merged, f"{len(store['merged'])} merged, {expect_merged} expected"),
                (store["incomplete"] or store["partial"], f"half-written: {store['incomplete'] + store['partial']}")]
    return "; ".join(text for found, text in problems if found) or "none"


def run_env(stack: Stack, workdir: Path, **extra: str) -> dict[str, str]:
    """The environment of a `mergeflow` command on `stack`."""
    return {**os.environ, **stack.env(), "PREFECT_HOME": str(workdir / "prefect-client"), **extra}


def short(text: str, width: int) -> str:
    """`text` cut at a word boundary to at most `width` characters."""
    import textwrap

    return textwrap.shorten(text, width, placeholder=" ...")


def last_line(log: Path) -> str:
    return ([line for line in log.read_text(errors="replace").splitlines() if line.strip()] or [""])[-1]
