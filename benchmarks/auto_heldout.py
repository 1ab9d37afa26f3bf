"""`method: auto` on five real text tasks no other part of Mergeflow uses (benchmarks/heldout_tasks.py), with
validation held out of the experts' training ("clean") and with validation drawn from training on three of the
five ("overlap"): the regret of its choice and its cost in Task Arithmetic sweeps, one command for both.

    python benchmarks/auto_heldout.py                  # both variants; ~1 h on 2 cores
    python benchmarks/auto_heldout.py --variants clean
    python benchmarks/auto_heldout.py --fidelity 0.25  # `auto` with search.fidelity 0.25 (default: search.fidelity's)

Per variant, in benchmarks/out/auto_heldout/<variant>/:
1. the experts (all-MiniLM-L6-v2, fine-tuned as the demo's: 60 steps) are trained by `mergeflow run` on a config
   whose only merge is plain Task Arithmetic, into benchmarks/out/auto_heldout/store (shared by the variants);
2. cost: two hard-linked copies of that store (every object is immutable, written once) with empty content
   caches, one run each, timed: a Task Arithmetic sweep over its grid, and `method: auto`; their wall-time ratio is
   the cost in TA-sweep units (the same definition as the README's demo figure);
   (kept in timings.json with the fidelity: a second call with the same fidelity only computes the regret again);
3. regret: benchmarks/auto_regret.py on the auto run's store: every point of the search space scored on test (for
   reference only), the best of them against the point chosen on validation, and the best single-method `--tune`.
The table printed at the end is the README's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import auto_regret  # noqa: E402
import heldout_tasks  # noqa: E402

from mergeflow.search_space import DEFAULT_FIDELITY  # noqa: E402

OUT = ROOT / "benchmarks" / "out" / "auto_heldout"
MERGEFLOW = str(Path(sys.executable).with_name("mergeflow"))
TA_GRID = {"scaling": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]}  # Task Arithmetic's own sweep grid


def config(name: str, tasks: dict[str, Path], store: Path, merges: list[dict]) -> dict:
    """A run config over the task directories `tasks`, the demo's model, fine-tuning and evaluation settings."""
    return {
        "name": name,
        "model": {"pretrained": "all-MiniLM-L6-v2"},
        "tasks": [{"name": t, "dataset": str(d)} for t, d in tasks.items()],
        "finetune": {"steps": 60, "batch_size": 16, "lr": 5.0e-5, "warmup_steps": 10, "max_length": 48},
        "merges": merges,
        "evaluation": {"max_length": 48},
        "tuning": {"max_examples": 100},
        "statistics": {"max_examples": 150, "max_length": 48},
        "storage": {"root": str(store), "cache_dir": str(store.parent / f"cache-{store.name}")},
        "tracking": {"tracking_uri": f"sqlite:///{store.parent / 'mlflow.db'}", "experiment": name},
    }


def write(path: Path, body: dict) -> Path:
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def run(path: Path, log: Path) -> float:
    """`mergeflow run path`, its output in `log`; wall seconds (SystemExit if it fails)."""
    started = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run([MERGEFLOW, "run", str(path)], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode:
        raise SystemExit(f"mergeflow run {path} failed ({done.returncode}); see {log}")
    return time.perf_counter() - started


def fresh_copy(store: Path, here: Path, name: str) -> Path:
    """A hard-linked copy of `store` as `here/name`, with no content cache beside it."""
    copy = here / name
    for stale in (copy, here / f"cache-{name}"):
        shutil.rmtree(stale, ignore_errors=True)
    shutil.copytree(store, copy, copy_function=os.link)
    return copy


def variant(name: str, tasks: dict[str, Path], fidelity: float = DEFAULT_FIDELITY) -> dict:
    here = OUT / name
    here.mkdir(parents=True, exist_ok=True)
    store = OUT / "store"  # the experts of both variants (two of their tasks are the same data: trained once)
    timed = here / "timings.json"
    auto = here / "auto.yaml"
    search = {"max_seconds": 1800, "fidelity": fidelity}
    done = json.loads(timed.read_text()) if timed.exists() else None
    if done is not None and done.get("fidelity") == fidelity:  # only the regret is computed again (test scores kept)
        print(f"[{name}] runs done before ({timed}); regret: auto_regret.py {auto}", flush=True)
        return regret(name, auto, done)
    trained = write(here / "experts.yaml", config(f"heldout-{name}-experts", tasks, store,
                                                  [{"method": "task_arithmetic"}]))
    print(f"[{name}] experts: mergeflow run {trained}", flush=True)
    run(trained, here / "experts.log")
    ta = write(here / "ta-sweep.yaml", config(f"heldout-{name}-ta", tasks, fresh_copy(store, here, "store-ta"),
                                              [{"method": "task_arithmetic", "sweep": TA_GRID}]))
    print(f"[{name}] TA sweep: mergeflow run {ta}", flush=True)
    ta_seconds = run(ta, here / "ta-sweep.log")
    write(auto, config(f"heldout-{name}", tasks, fresh_copy(store, here, "store-auto"),
                       [{"method": "auto", "search": search}]))
    print(f"[{name}] auto: mergeflow run {auto}", flush=True)
    auto_seconds = run(auto, here / "auto.log")
    print(f"[{name}] TA sweep {ta_seconds:.0f} s, auto {auto_seconds:.0f} s; regret: auto_regret.py {auto}",
          flush=True)
    timings = {"ta_seconds": ta_seconds, "auto_seconds": auto_seconds, "fidelity": fidelity}
    timed.write_text(json.dumps(timings))
    return regret(name, auto, timings)


def regret(name: str, auto: Path, timings: dict[str, float]) -> dict:
    auto_regret.main([str(auto)])
    found = json.loads((ROOT / "benchmarks" / "out" / "auto_regret" / f"heldout-{name}.json").read_text())
    return {**found, **timings}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="clean,overlap")
    parser.add_argument("--fidelity", type=float, default=DEFAULT_FIDELITY,
                        help=f"search.fidelity of the auto run (default {DEFAULT_FIDELITY}, the config's)")
    args = parser.parse_args(argv)
    data = heldout_tasks.build(OUT / "data", ROOT / ".mergeflow" / "cache" / "wheels")
    results = {v: variant(v, data[v], args.fidelity) for v in args.variants.split(",")}
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    print("| benchmark | auto chose | its test norm. avg | best point on test | regret (points) | best --tune "
          "(test) | cost (TA sweeps) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for v, r in results.items():
        auto = r["searches"]["auto (racing, as it runs)"]
        tune = max(r["tune"].values(), key=lambda t: t["test_norm_avg"])
        print(f"| held-out, {v} | {auto['chosen']} | {100 * auto['test_norm_avg']:.1f} | "
              f"{r['best']['candidate']} {100 * r['best']['test_norm_avg']:.1f} | {100 * auto['regret']:.1f} | "
              f"{tune['chosen']} {100 * tune['test_norm_avg']:.1f} | "
              f"{r['auto_seconds'] / r['ta_seconds']:.1f} ({r['auto_seconds']:.0f} s / {r['ta_seconds']:.0f} s) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
