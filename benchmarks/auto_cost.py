"""The cost of `method: auto` on the demo, in Task Arithmetic sweeps: `configs/demo-auto.yaml` and the same run with
a Task Arithmetic sweep over its grid instead, each `mergeflow run` on a fresh hard-linked copy of the demo's inputs
(the base, datasets, heads and experts `make demo` stored; none of its sweep scores, evaluations or merges) with an
empty content cache, one after the other; prints both wall times, the ratio (the README's "cost") and the search's
own rung lines.

    python benchmarks/auto_cost.py            # after `make demo`; ~15 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks")]

from auto_heldout import TA_GRID, run, write  # noqa: E402

OUT = ROOT / "benchmarks" / "out" / "auto_cost"
INPUTS = ("base", "checkpoints", "datasets", "experts", "heads")  # what the experts' run leaves that both runs read


def fresh_copy(store: Path, name: str) -> Path:
    """A hard-linked copy of the inputs in `store` as OUT/store-name, with no content cache beside it."""
    copy = OUT / f"store-{name}"
    for stale in (copy, OUT / f"cache-store-{name}"):
        shutil.rmtree(stale, ignore_errors=True)
    for folder in INPUTS:
        if (store / folder).is_dir():
            shutil.copytree(store / folder, copy / folder, copy_function=os.link)
    return copy


def timed(name: str, merges: list[dict], store: Path) -> float:
    """Wall seconds of the demo-auto config with `merges`, on a fresh copy of `store`."""
    body = yaml.safe_load((ROOT / "configs" / "demo-auto.yaml").read_text())
    copy = fresh_copy(store, name)
    body.update(name=f"cost-{name}", merges=merges,
                storage={"root": str(copy), "cache_dir": str(OUT / f"cache-store-{name}")},
                tracking={"tracking_uri": f"sqlite:///{OUT / 'mlflow.db'}", "experiment": "auto-cost"})
    config = write(OUT / f"{name}.yaml", body)
    print(f"{name}: mergeflow run {config}", flush=True)
    seconds = run(config, OUT / f"{name}.log")
    print(f"{name}: {seconds:.1f} s", flush=True)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=ROOT / ".mergeflow" / "store", help="the demo's store")
    args = parser.parse_args(argv)
    if not (args.store / "experts").is_dir():
        raise SystemExit(f"{args.store} holds no experts: run `make demo` first")
    OUT.mkdir(parents=True, exist_ok=True)
    demo = yaml.safe_load((ROOT / "configs" / "demo-auto.yaml").read_text())
    ta = timed("ta-sweep", [{"method": "task_arithmetic", "sweep": TA_GRID}], args.store)
    auto = timed("auto", demo["merges"], args.store)
    for line in (OUT / "auto.log").read_text().splitlines():
        if "search auto:" in line:
            print("  " + line.split(" - ", 1)[-1])
    result = {"ta_seconds": round(ta, 1), "auto_seconds": round(auto, 1), "cost": round(auto / ta, 2)}
    (OUT / "result.json").write_text(json.dumps(result))
    print(f"auto {auto:.0f} s / TA sweep {ta:.0f} s = {auto / ta:.1f} TA sweeps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
