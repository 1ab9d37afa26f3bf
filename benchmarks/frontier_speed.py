"""TSV-M, Iso-C, Iso-CTS and WUDI: Mergeflow's whole CLI beside FusionBench 0.2.33's own implementations, and the
subspace stage serving an alpha sweep.

Inputs: the seeded ViT-B/32-shaped visual tower of vit_models.py (open_clip key names, 12 blocks, 88 M fp32
parameters) and 8 experts with structured task vectors (doge_speed.py's generator: a few strong directions per
expert and two shared ones in dense noise), regenerated into `benchmarks/out/frontier/` (git-ignored, ~3.2 GB).
Each measurement runs in a FRESH subprocess (peak RSS: the child's VmHWM, or for the CLI the RUSAGE_CHILDREN
maximum of the `mergeflow merge` process it starts):
  mergeflow   `mergeflow merge --method M ...` on the files (load, merge, write: the whole command)
  fusionbench FusionBench's function (loaded from its wheel, see fusionbench_code.py) as its algorithm class runs
              it: every model loaded, task vectors as state dicts, the function, theta_0 + update, then written.
              WUDI's autograd loop costs ~16x Mergeflow's per step (hours on this CPU): it runs `--fb-wudi-steps`
              steps on the layers of the first `--fb-wudi-blocks` blocks, and its full time is extrapolated from
              the measured per-step time of each layer shape (printed as such).
  sweep       the subspace stage (`write_subspace`, kind "task") once, then TSV-M merges at 5 alphas reading it,
              beside one TSV-M merge that computes its own SVDs.
Prints wall time, peak RSS, the ratios and the largest relative Frobenius error of the update per 2-D tensor.

    python benchmarks/frontier_speed.py                        # full size (about 45 min on 2 cores)
    python benchmarks/frontier_speed.py --blocks 1 --experts 4 --methods tsv,iso_c   # quick check
    python benchmarks/frontier_speed.py --reuse     # measure only what the last run did not keep
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fusionbench_code
import vit_models
from doge_speed import SPEC_VERSION, structured_task_vector

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GB = 1e9
METHODS = ("tsv", "iso_c", "iso_cts", "wudi")
ALPHAS = (0.5, 0.75, 1.0, 1.25, 1.5)


def _peak_self() -> int:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(status["VmHWM"].split()[0]) * 1024


def _inputs(workdir: Path, experts: int) -> tuple[Path, list[Path]]:
    return workdir / "base.safetensors", [workdir / f"expert_{i}.safetensors" for i in range(experts)]


def run_cli(method: str, args: argparse.Namespace) -> dict:
    base, experts = _inputs(Path(args.workdir), args.experts)
    out = Path(args.workdir) / f"mergeflow-{method}"
    cmd = [str(Path(sys.executable).with_name("mergeflow")), "merge", "--method", method, "--base", str(base),
           "--out", str(out), "--overwrite", "--device", "cpu", *[a for e in experts for a in ("--expert", str(e))]]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"mergeflow {method} failed:\n{done.stderr[-4000:]}")
    return {"wall_s": wall, "peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}


def run_fusionbench(method: str, args: argparse.Namespace) -> dict:
    base_path, expert_paths = _inputs(Path(args.workdir), args.experts)
    start = time.perf_counter()
    base = load_file(str(base_path))
    task_vectors = []
    for path in expert_paths:  # as the algorithm classes: load each model, subtract, drop the model
        expert = load_file(str(path))
        task_vectors.append({k: expert[k] - base[k] for k in base})
        del expert
    extra: dict = {}
    if method == "tsv":
        update = fusionbench_code.load("tsvm").compute_and_sum_svd_mem_reduction(task_vectors, accelerator="cpu")
    elif method == "iso_c":
        update = fusionbench_code.load("iso").iso_c(task_vectors, accelerator="cpu")
    elif method == "iso_cts":
        update = fusionbench_code.load("iso").iso_cts(task_vectors, 0.8, accelerator="cpu")
    else:
        keep = [k for k in base if base[k].dim() != 2 or not k.startswith("transformer.resblocks.")
                or int(k.split(".")[2]) < args.fb_wudi_blocks]
        from mergeflow.methods.wudi import wudi_gram

        wudi = fusionbench_code.load("wudi").wudi_merging
        seconds, update, worst = {}, {}, (0.0, "")
        for key in keep:  # one key at a time, timed (the function loops over keys the same way)
            started = time.perf_counter()
            steps = args.fb_wudi_steps if base[key].dim() == 2 else 0
            update.update(wudi([{key: tv[key]} for tv in task_vectors], accelerator="cpu", iter_num=steps))
            seconds[key] = time.perf_counter() - started
            if base[key].dim() == 2:  # Mergeflow's solver on the same layer and steps (not timed)
                ours = wudi_gram(torch.stack([tv[key] for tv in task_vectors]), steps, 1e-5)
                error = float((ours - update[key]).double().norm() / update[key].double().norm())
                worst = max(worst, (error, key))
        extra = {"key_s": seconds, "shapes": {k: list(base[k].shape) for k in base}, "steps": args.fb_wudi_steps,
                 "update_error": worst}
    merged = {k: base[k] + update[k] for k in update}
    save_file(merged, str(Path(args.workdir) / f"fusionbench-{method}.safetensors"))
    return {"wall_s": time.perf_counter() - start, "peak_rss": _peak_self(), **extra}


def run_sweep(args: argparse.Namespace) -> dict:
    from mergeflow.content_cache import ContentCache
    from mergeflow.merge import merge_checkpoints
    from mergeflow.subspace import write_subspace
    from mergeflow.task_vectors import open_pool

    workdir = Path(args.workdir)
    base, experts = _inputs(workdir, args.experts)
    cache = ContentCache(workdir / "cache")
    stage_dir = workdir / "subspace-task"
    shutil.rmtree(stage_dir, ignore_errors=True)
    stage_dir.mkdir()
    start = time.perf_counter()
    with open_pool(str(base), {p.stem: str(p) for p in experts}, "cpu", cache=cache) as pool:
        write_subspace(pool, "task", stage_dir)
    stage = time.perf_counter() - start
    points = []
    for alpha in ALPHAS:
        started = time.perf_counter()
        merge_checkpoints("tsv", str(base), [str(p) for p in experts], str(workdir / "sweep-point"),
                          {"alpha": alpha}, device="cpu", overwrite=True, cache=cache, subspaces={"task": stage_dir})
        points.append(time.perf_counter() - started)
    size = sum(p.stat().st_size for p in stage_dir.iterdir())
    return {"stage_s": stage, "points_s": points, "bytes": size, "peak_rss": _peak_self()}


def child(args: argparse.Namespace) -> None:
    kind, method = args.child.split(":")
    result = {"mergeflow": run_cli, "fusionbench": run_fusionbench}[kind](method, args) if kind != "sweep" \
        else run_sweep(args)
    print(json.dumps(result))


def measure(kind: str, args: argparse.Namespace) -> dict:
    """One child's result, also kept in <workdir>/results/; with --reuse a kept result is read instead."""
    kept = Path(args.workdir) / "results" / f"{kind.replace(':', '-')}.json"
    if args.reuse and kept.exists():
        print(f"{kind}: reusing {kept}", flush=True)
        return json.loads(kept.read_text())
    cmd = [sys.executable, __file__, "--child", kind, "--workdir", args.workdir, "--experts", str(args.experts),
           "--fb-wudi-steps", str(args.fb_wudi_steps), "--fb-wudi-blocks", str(args.fb_wudi_blocks)]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:  # reported in the table (FusionBench's Iso-CTS can fail to converge), not fatal
        last = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:] or ["(no message)"]
        print(f"{kind} failed after {time.perf_counter() - started:.0f} s: {last[0]}", flush=True)
        return {"error": last[0], "wall_s": time.perf_counter() - started}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    kept.parent.mkdir(exist_ok=True)
    kept.write_text(json.dumps(result))
    print(f"{kind}: done in {time.perf_counter() - started:.1f} s, peak RSS {result['peak_rss'] / GB:.2f} GB",
          flush=True)
    return result


def update_errors(workdir: Path, method: str) -> tuple[int, float, str]:
    """(2-D tensors compared, the largest relative error of Mergeflow's update against FusionBench's, where)."""
    from mergeflow.checkpoints import open_checkpoint
    from mergeflow.content_cache import ContentCache

    worst, where, count = 0.0, "", 0
    ours = open_checkpoint(str(workdir / f"mergeflow-{method}"), cache=ContentCache(workdir / "cache"))
    with ours, safe_open(str(workdir / f"fusionbench-{method}.safetensors"), "pt") as theirs, \
            safe_open(str(workdir / "base.safetensors"), "pt") as base:
        for name in theirs.keys():
            theta0 = base.get_tensor(name).double()
            if theta0.dim() != 2:
                continue
            reference = theirs.get_tensor(name).double() - theta0
            error = float((ours.get(name).double() - theta0 - reference).norm() / reference.norm())
            count += 1
            if error > worst:
                worst, where = error, name
    return count, worst, where


def extrapolate_wudi(fb: dict, steps: int) -> float:
    """FusionBench WUDI's full time at `steps` steps: its measured load/save overhead plus, per 2-D layer of the
    whole model, the measured per-step time of a measured layer of that shape."""
    shapes = {k: tuple(s) for k, s in fb["shapes"].items()}
    per_step: dict[tuple, float] = {}
    for key, seconds in fb["key_s"].items():
        if len(shapes[key]) == 2:
            per_step[shapes[key]] = seconds / fb["steps"]
    counts = Counter(s for s in shapes.values() if len(s) == 2)
    measured_keys = sum(fb["key_s"].values())
    return fb["wall_s"] - measured_keys + sum(per_step[s] * steps * n for s, n in counts.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--fb-wudi-steps", type=int, default=10, help="steps of FusionBench's WUDI per layer")
    parser.add_argument("--fb-wudi-blocks", type=int, default=1, help="blocks FusionBench's WUDI optimises")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--reuse", action="store_true", help="read the results a previous run kept, measure the rest")
    parser.add_argument("--workdir", default=str(ROOT / "benchmarks" / "out" / "frontier"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    methods = [m for m in args.methods.split(",") if m]
    if unknown := sorted(set(methods) - set(METHODS)):
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")

    workdir = Path(args.workdir)
    base, experts = vit_models.ensure_models(workdir, args.seed, args.blocks, args.experts, structured_task_vector,
                                             {"version": SPEC_VERSION, "generator": "structured"})
    from mergeflow.content_cache import ContentCache  # digest the inputs once, so no timed run pays for hashing
    for path in (base, *experts):
        ContentCache(workdir / "cache").fetch(str(path))
    fusionbench_code.wheel_path()

    rows = []
    for method in methods:
        print(f"{method}: mergeflow ...", flush=True)
        ours = measure(f"mergeflow:{method}", args)
        print(f"{method}: fusionbench ...", flush=True)
        theirs = measure(f"fusionbench:{method}", args)
        fb_wall, note = theirs["wall_s"], ""
        if "error" in ours or "error" in theirs:
            rows.append((method, ours, theirs, fb_wall, 0, float("nan"), "", ""))
            continue
        if method != "wudi":
            count, worst, where = update_errors(workdir, method)
        else:
            count = sum(len(s) == 2 for k, s in theirs["shapes"].items() if k in theirs["key_s"])
            worst, where = theirs["update_error"]
            fb_wall = extrapolate_wudi(theirs, 400)
            note = (f" (extrapolated: {theirs['steps']} steps on {args.fb_wudi_blocks} block(s) took "
                    f"{theirs['wall_s']:.0f} s; errors: Mergeflow's solver on those layers, same steps)")
        rows.append((method, ours, theirs, fb_wall, count, worst, where, note))

    print(f"\nViT-B/32-shaped, {args.blocks} blocks, {args.experts} experts, seed {args.seed}; CPU, "
          f"{torch.get_num_threads()} threads; peak RSS = child VmHWM, GB = 1e9 bytes\n")
    print("| method | Mergeflow CLI | FusionBench 0.2.33 | speed-up | memory ratio | max rel. error of the update |")
    print("|---|---|---|---|---|---|")
    for method, ours, theirs, fb_wall, count, worst, where, note in rows:
        if "error" in ours or "error" in theirs:
            failed = "Mergeflow" if "error" in ours else "FusionBench"
            print(f"| {method} | " + " | ".join(
                f"failed after {r['wall_s']:.0f} s: {r['error']}" if "error" in r else
                f"{r['wall_s']:.1f} s, {r['peak_rss'] / GB:.2f} GB" for r in (ours, theirs)) + f" | – | – | "
                f"({failed} failed) |")
            continue
        print(f"| {method} | {ours['wall_s']:.1f} s, {ours['peak_rss'] / GB:.2f} GB | {fb_wall:.1f} s, "
              f"{theirs['peak_rss'] / GB:.2f} GB | {fb_wall / ours['wall_s']:.1f}x | "
              f"{ours['peak_rss'] / theirs['peak_rss']:.2f} | {worst:.1e} ({count} tensors; {where}){note} |")
    if not args.skip_sweep:
        print("\nsweep: subspace stage + 5 TSV-M merges reading it ...", flush=True)
        sweep = measure("sweep:tsv", args)
        single = next((r[1]["wall_s"] for r in rows if r[0] == "tsv"), None)
        points = sweep["points_s"]
        print(f"subspace stage (task triplets): {sweep['stage_s']:.1f} s, {sweep['bytes'] / GB:.2f} GB stored; "
              f"TSV-M merges at alpha {', '.join(map(str, ALPHAS))} reading it: "
              f"{', '.join(f'{p:.1f}' for p in points)} s (total {sum(points):.1f} s); stage + sweep "
              f"{sweep['stage_s'] + sum(points):.1f} s" + (f" vs one TSV-M merge without it {single:.1f} s (CLI)"
                                                          if single else ""))


if __name__ == "__main__":
    main()
