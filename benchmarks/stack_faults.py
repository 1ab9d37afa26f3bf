"""Server faults mid-run on a real local stack (issue 34): SeaweedFS SIGKILLed while a model is published to it and
restarted; MLflow SIGKILLed during a run and restarted, and down longer than a run waits; the Prefect server
SIGKILLed and restarted under `mergeflow serve` (a run in flight, one triggered after), and SIGKILLed under
`mergeflow run` and left down; `mergeflow run` SIGKILLed during a merge, then run again. Prints one row per fault:
what happens | time to recover | data lost (goal: none).

    .venv/bin/python benchmarks/stack_faults.py                  # every fault (~20-30 min on 2 cores)
    .venv/bin/python benchmarks/stack_faults.py --only mlflow,sigkill --down 10

A fresh `mergeflow stack` on free ports serves them all, stopped at the end. A `sitecustomize` on the runs'
PYTHONPATH (`work_env`) logs each stage work call with its Prefect task run: a rerun that computes a stage stored
before the fault is seen. tests/test_faults.py and stack_load.py reuse these helpers."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack_harness import (EXE, Stack, finish, kill_group, last_line, losses, mlflow_report, run_env,  # noqa: E402
                           short, start, store_report, tiny_config, wait_line, work_done, work_env)

def fault_mlflow_restart(stack: Stack, workdir: Path, down: float) -> dict[str, Any]:
    """MLflow SIGKILLed while the experts fine-tune, restarted `down` s later (same port and database)."""
    env = run_env(stack, workdir)
    config = tiny_config(workdir / "mlflow-restart.yaml", "fault-mlflow", "s3://mergeflow/fault-mlflow",
                         env["MLFLOW_TRACKING_URI"], registered_model="fault-mlflow")
    log = workdir / "mlflow-restart.log"
    run = start([EXE, "run", str(config)], log, work_env(workdir, workdir / "mlflow-restart.work", env), workdir)
    try:
        wait_line(log, "start finetune-expert-", run, 900)
        stack.kill("mlflow")
        killed = time.monotonic()
        time.sleep(down)
        stack.up()
        back, seen = time.monotonic(), len(log.read_text(errors="replace"))
        moving = wait_line(log, "] done ", run, 900, after=seen)  # a stage ends: the run moves again
        code = run.wait(timeout=1800)
    finally:
        kill_group(run)
    text = log.read_text(errors="replace")
    waited = f"{text.count('does not answer')} MLflow calls waited (capped backoff)" if "does not answer" in text \
        else f"MLflow's own HTTP retries: {text.count('connectionpool - Retrying')} warnings"
    happens = (f"{waited}; run "
               + ("completed" if code == 0 else f"FAILED (exit {code}): {last_line(log)}"))
    lost = losses(mlflow_report(env["MLFLOW_TRACKING_URI"], "fault-mlflow"),
                  store_report(env, "mergeflow", "fault-mlflow/"), 1)
    return {"fault": f"MLflow SIGKILLed mid-run, restarted after {down:.0f} s (down {back - killed:.0f} s)",
            "happens": happens, "recover_s": max(0.0, moving - back), "lost": lost, "ok": code == 0}


def outage_then_rerun(stack: Stack, workdir: Path, service: str, name: str, wait_env: str,
                      wait: float) -> dict[str, Any]:
    """`service` SIGKILLed while a run fine-tunes and left down until the run (waiting `wait_env`=`wait` s) ends;
    then up, and the same config run again: exit codes, when the first run ended, what the rerun recomputed."""
    env = run_env(stack, workdir, **{wait_env: str(wait)})
    config = tiny_config(workdir / f"{name}.yaml", f"fault-{name}", f"s3://mergeflow/fault-{name}",
                         env["MLFLOW_TRACKING_URI"])
    first, second = workdir / f"{name}-1.log", workdir / f"{name}-2.log"
    run = start([EXE, "run", str(config)], first, work_env(workdir, workdir / f"{name}-1.work", env), workdir)
    try:
        wait_line(first, "start finetune-expert-", run, 900)
        stack.kill(service)
        killed = time.monotonic()
        code = run.wait(timeout=wait + 1800)
        ended_after = time.monotonic() - killed
    finally:
        kill_group(run)
    stack.up()
    back = time.monotonic()
    code2 = finish(config, second, work_env(workdir, workdir / f"{name}-2.work", env), workdir)
    recomputed = set(work_done(workdir / f"{name}-1.work")) & set(work_done(workdir / f"{name}-2.work"))
    mlflow = mlflow_report(env["MLFLOW_TRACKING_URI"], f"fault-{name}")
    lost = losses(mlflow, store_report(env, "mergeflow", f"fault-{name}/"), 1)
    return {"code": code, "ended_after": ended_after, "code2": code2, "recomputed": recomputed, "log": first,
            "mlflow": mlflow, "recover_s": time.monotonic() - back,
            "lost": f"{lost}; recomputed {sorted(recomputed)}" if recomputed else lost,
            "ok": code != 0 and code2 == 0 and not recomputed}


def _rerun_words(result: dict[str, Any]) -> str:
    return ("completed" if result["code2"] == 0 else f"FAILED (exit {result['code2']})") \
        + f", {len(result['recomputed'])} stages recomputed"


def fault_mlflow_outage(stack: Stack, workdir: Path, wait: float) -> dict[str, Any]:
    """MLflow SIGKILLed and left down longer than the run waits (`MERGEFLOW_MLFLOW_WAIT`); then up, and a rerun."""
    result = outage_then_rerun(stack, workdir, "mlflow", "outage", "MERGEFLOW_MLFLOW_WAIT", wait)
    closed = [why for status, why in result["mlflow"]["parents"].values() if status == "FAILED" and why]
    happens = (f"run failed after {result['ended_after']:.0f} s (exit {result['code']}): "
               f"\"{short(last_line(result['log']), 150)}\"; rerun {_rerun_words(result)}"
               + (f"; first run's MLflow run closed FAILED ({short(closed[0], 90)})" if closed else ""))
    return {"fault": f"MLflow SIGKILLed, down past the wait ({wait:.0f} s), then up + rerun", "happens": happens,
            **{key: result[key] for key in ("recover_s", "lost", "ok")}}


def fault_prefect_lost(stack: Stack, workdir: Path, wait: float) -> dict[str, Any]:
    """The Prefect server SIGKILLed under `mergeflow run` and left down past the run's wait
    (`MERGEFLOW_PREFECT_WAIT`); then up, and the same config run again."""
    result = outage_then_rerun(stack, workdir, "prefect", "prefect-lost", "MERGEFLOW_PREFECT_WAIT", wait)
    said = next((line.strip().split(" (wait longer")[0] for line in result["log"].read_text(errors="replace")
                 .splitlines() if "has not answered for" in line), last_line(result["log"]))
    happens = (f"run stopped {result['ended_after']:.0f} s after the kill (exit {result['code']}): "
               f"\"{short(said, 150)}\"; rerun {_rerun_words(result)}")
    return {"fault": f"Prefect server SIGKILLed under `mergeflow run`, down past the run's wait ({wait:.0f} s), then "
                     "up + rerun", "happens": happens, **{key: result[key] for key in ("recover_s", "lost", "ok")}}


def fault_flow_sigkill(stack: Stack, workdir: Path) -> dict[str, Any]:
    """`mergeflow run` SIGKILLed during a merge (DOGE TA), then the same config run again."""
    env = run_env(stack, workdir)
    merges = [{"method": "task_arithmetic"}, {"method": "doge_ta", "params": {"steps": 100}}]
    config = tiny_config(workdir / "sigkill.yaml", "fault-sigkill", "s3://mergeflow/fault-sigkill",
                         env["MLFLOW_TRACKING_URI"], merges=merges)
    result = sigkill_and_rerun(config, workdir, env, "merge-doge_ta")
    store = store_report(env, "mergeflow", "fault-sigkill/")
    mlflow = mlflow_report(env["MLFLOW_TRACKING_URI"], "fault-sigkill")
    closed = [why for status, why in mlflow["parents"].values() if status == "FAILED" and why]
    happens = (f"killed {result['killed_after']:.0f} s into the run, mid-merge; stored: nothing under the merge's "
               f"name; its staging folders in the local cache: {result['staging_left']}, removed by the rerun: "
               f"{result['staging_left'] - result['staging_after']}; rerun "
               + ("completed" if result["code"] == 0 else f"FAILED (exit {result['code']})") + ","
               + f" computing only what was not stored: {sorted(n for _, n in result['rerun'])}"
               + (f"; the killed run's MLflow run closed FAILED ({short(closed[0], 120)})" if closed else ""))
    lost = losses(mlflow, store, 2)
    if result["recomputed"]:
        lost = f"{lost}; stages stored before the kill recomputed: {sorted(result['recomputed'])}"
    return {"fault": "flow process SIGKILLed during a merge, then rerun", "happens": happens,
            "recover_s": result["rerun_s"], "lost": lost, "ok": result["code"] == 0 and not result["recomputed"]}


def publish_killed_midway(workdir: Path, uri: str, options: dict[str, Any], keys: Callable[[], list[str]],
                          kill: Callable[[], None], restart: Callable[[], None], shards: int = 8,
                          shard_mb: int = 16) -> dict[str, Any]:
    """Publish `shards` files of `shard_mb` MiB under `uri` (the manifest last, as a merge does); `kill()` the store
    once three are stored, `restart()` it and publish the same inputs again. What a reader saw, what was uploaded
    again, and when (monotonic seconds)."""
    import threading

    from mergeflow.content_cache import ContentCache
    from mergeflow.storage import exists, fetch_directory, filesystem, publish_directory, sha256_file

    source = workdir / f"publish-{time.monotonic_ns()}"
    source.mkdir(parents=True)
    for i in range(shards):
        (source / f"model-{i:05d}-of-{shards:05d}.safetensors").write_bytes(os.urandom(shard_mb * 2**20))
    (source / "mergeflow.json").write_text('{"files": "all of them"}')
    digests = {p.name: sha256_file(p) for p in source.iterdir()}

    def staged() -> Path:  # the task builds the same inputs again for each attempt
        import shutil

        copy = workdir / f"staged-{time.monotonic_ns()}"
        shutil.copytree(source, copy, copy_function=os.link)
        return copy

    times: dict[str, float] = {}

    def kill_after_three() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if sum(k.endswith(".safetensors") and ".partial-" not in k for k in keys()) >= 3:
                kill()
                times["killed"] = time.monotonic()
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_after_three)
    watcher.start()
    try:
        publish_directory(staged(), uri, options, last=("mergeflow.json",))
        error: BaseException | None = None
    except Exception as failure:  # noqa: BLE001 - what the publishing call raised is the result
        error = failure
    times["failed"] = time.monotonic()
    watcher.join()
    restart()
    times["restarted"] = time.monotonic()
    stored = {k.rsplit("/", 1)[-1] for k in keys() if ".partial-" not in k and "/.mergeflow-" not in k}
    visible = exists(uri, options)
    try:
        fetch_directory(uri, ContentCache(workdir / "reader-cut"), options)
        read_error = None
    except Exception as failure:  # noqa: BLE001 - a reader must be refused
        read_error = failure
    fs, _ = filesystem(uri, options)
    uploaded: list[str] = []
    put_file = fs.put_file
    fs.put_file = lambda local, remote, **kw: uploaded.append(Path(local).name) or put_file(local, remote, **kw)
    try:
        published = publish_directory(staged(), uri, options, last=("mergeflow.json",))
    finally:
        del fs.put_file
    times["done"] = time.monotonic()
    _, files = fetch_directory(uri, ContentCache(workdir / "reader-whole"), options)
    leftovers = [k for k in keys() if ".partial-" in k or "/.mergeflow-" in k]
    return {"error": error, "times": times, "digests": digests, "stored": stored, "visible_when_cut": visible,
            "read_error": read_error, "published": published, "uploaded": uploaded, "files": files,
            "leftovers": leftovers}


def publish_row(result: dict[str, Any], shards: int, shard_mb: int) -> dict[str, Any]:
    """The fault table's row of `publish_killed_midway`."""
    times, error = result["times"], result["error"]
    message = short(str(error).splitlines()[0].split(": ", 1)[-1], 80) if error else "(no error)"
    whole = result["files"] == result["digests"] and not result["leftovers"]
    happens = (f"the publishing call failed {times['failed'] - times['killed']:.0f} s after the kill "
               f"({type(error).__name__}, retried by the task: \"{message}\"); readers saw "
               + ("no output" if not result["visible_when_cut"] and result["read_error"] else "A PARTIAL OUTPUT")
               + f"; the rerun uploaded {len(result['uploaded'])} of {len(result['digests'])} files "
               f"({len(result['stored'])} kept)")
    lost = "none" if whole else f"published files differ or leftovers: {result['leftovers']}"
    return {"fault": f"SeaweedFS SIGKILLed mid-publish ({shards} x {shard_mb} MiB), restarted",
            "happens": happens, "recover_s": times["done"] - times["restarted"], "lost": lost,
            "ok": whole and error is not None and not result["visible_when_cut"]}


def fault_s3_publish(stack: Stack, workdir: Path, shards: int = 8, shard_mb: int = 16) -> dict[str, Any]:
    """The stack's SeaweedFS SIGKILLed while a merged model is published to it, restarted (`stack up`), republished."""
    import boto3

    env = stack.env()
    options = {"key": env["AWS_ACCESS_KEY_ID"], "secret": env["AWS_SECRET_ACCESS_KEY"],
               "endpoint_url": env["AWS_ENDPOINT_URL_S3"],
               "config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"}, "connect_timeout": 2}}
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")

    def keys() -> list[str]:
        listing = client.list_objects_v2(Bucket="mergeflow", Prefix="fault-s3/")
        return [o["Key"] for o in listing.get("Contents", [])]

    result = publish_killed_midway(workdir, "s3://mergeflow/fault-s3/merged/run/big", options, keys,
                                   lambda: stack.kill("s3"), stack.up, shards, shard_mb)
    return publish_row(result, shards, shard_mb)


def sigkill_and_rerun(config: Path, workdir: Path, env: dict[str, str], stage: str) -> dict[str, Any]:
    """Run `config`, SIGKILL the run 1 s after `stage` starts, run it again; what each computed and how long."""
    first, second = workdir / f"{config.stem}-1.log", workdir / f"{config.stem}-2.log"
    work1, work2 = workdir / f"{config.stem}-1.work", workdir / f"{config.stem}-2.work"
    started = time.monotonic()
    run = start([EXE, "run", str(config)], first, work_env(workdir, work1, env), workdir)
    try:
        wait_line(first, f"start {stage}", run, 900)
        time.sleep(1.0)
    finally:
        kill_group(run)
    killed_after = time.monotonic() - started
    if f"done  {stage}" in first.read_text(errors="replace"):
        raise RuntimeError(f"{stage} finished before the kill: make it longer")
    staging = Path(yaml.safe_load(config.read_text())["storage"]["cache_dir"]) / "staging"
    killed_staging = set(staging.iterdir()) if staging.is_dir() else set()
    rerun_started = time.monotonic()
    code = finish(config, second, work_env(workdir, work2, env), workdir)
    done1, done2 = work_done(work1), work_done(work2)
    return {"code": code, "killed_after": killed_after, "rerun_s": time.monotonic() - rerun_started,
            "first": done1, "rerun": done2, "recomputed": set(done1) & set(done2), "staging_left": len(killed_staging),
            "staging_after": sum(path.exists() for path in killed_staging),
            "log": second}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| fault | what happens | time to recover | data lost |", "|---|---|---:|---|"]
    for row in rows:
        recover = "-" if row.get("recover_s") is None else f"{row['recover_s']:.0f} s"
        lines.append(f"| {row['fault']} | {row['happens']} | {recover} | {row['lost']} |")
    return "\n".join(lines)


FAULTS = ("s3", "mlflow", "mlflow-wait", "prefect", "prefect-long", "prefect-lost", "sigkill")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(FAULTS), help=f"comma-separated, of {', '.join(FAULTS)}")
    parser.add_argument("--down", type=float, default=10.0, help="seconds a server stays down before its restart")
    parser.add_argument("--long-down", type=float, default=90.0, help="prefect-long: seconds the server stays down")
    parser.add_argument("--wait", type=float, default=20.0,
                        help="mlflow-wait, prefect-lost: the run's MERGEFLOW_MLFLOW_WAIT / MERGEFLOW_PREFECT_WAIT")
    parser.add_argument("--workdir", help="keep logs and configs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    chosen = [f.strip() for f in args.only.split(",") if f.strip()]
    if set(chosen) - set(FAULTS):
        parser.error(f"unknown faults {sorted(set(chosen) - set(FAULTS))}; expected some of {', '.join(FAULTS)}")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="stack-faults-"))
    workdir.mkdir(parents=True, exist_ok=True)
    stack = Stack(workdir / "stack")
    print(f"stack up in {stack.up():.0f} s (state and logs: {workdir})", flush=True)
    from stack_load import fault_prefect_restart  # beside the served-deployment helpers

    faults = {"s3": lambda: fault_s3_publish(stack, workdir),
              "mlflow": lambda: fault_mlflow_restart(stack, workdir, args.down),
              "mlflow-wait": lambda: fault_mlflow_outage(stack, workdir, args.wait),
              "prefect": lambda: fault_prefect_restart(stack, workdir, args.down),
              "prefect-long": lambda: fault_prefect_restart(stack, workdir, args.long_down),
              "prefect-lost": lambda: fault_prefect_lost(stack, workdir, args.wait),
              "sigkill": lambda: fault_flow_sigkill(stack, workdir)}
    rows, started = [], time.monotonic()
    try:
        for fault in chosen:
            begun = time.monotonic()
            rows.append(row := faults[fault]())
            print(f"{fault}: {json.dumps(row, default=str)} ({time.monotonic() - begun:.0f} s)", flush=True)
    finally:
        stack.down()
    print(f"\n{table(rows)}\n\n{len(rows)} faults in {time.monotonic() - started:.0f} s")
    return 0 if all(row["lost"] == "none" and row.get("ok", True) for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
