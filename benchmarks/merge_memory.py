"""Peak memory and wall time of the streaming merge engine, checked against a plain in-memory reference.

Generates, from a seed, a ViT-B/32-shaped visual tower (open_clip key names; 12 blocks, width 768, ~88 M fp32
parameters) and N experts (base + a seeded task vector: gaussian with a per-tensor scale plus sparse large
entries), each a single-file safetensors in the work dir (reused when the recorded seed/shape match). Then, for
each method, in a FRESH subprocess each so that the peak RSS (the child's VmHWM) belongs to one run:
  engine     mergeflow.merge_checkpoints(..., device="cpu")
  reference  safetensors.torch.load_file of base and all experts, the dense formula applied directly (written
             independently of mergeflow's methods and sparsify)
and compares the two outputs tensor by tensor. Exits 1 if they differ.

    python benchmarks/merge_memory.py                          # full size: 12 blocks, 8 experts
    python benchmarks/merge_memory.py --blocks 2 --experts 3   # quick check
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import vit_models
from vit_models import generator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing mergeflow

SCALING, DENSITY = 0.3, 0.2
METHODS = {"ta": ("task_arithmetic", {"scaling": SCALING}),
           "ties": ("ties", {"density": DENSITY, "scaling": SCALING, "merge": "sum"})}
GOALS_GB = {"ta": 1.5, "ties": 2.5}  # engine peak RSS goals
GB = 1e9
SPEC_VERSION = 1  # bump when the generator below changes


def _task_vector(seed: int, expert: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Gaussian with a per-tensor scale, plus ~2% sparse entries 10x larger (so top-k is not trivial)."""
    g = generator(seed, "expert", expert, name)
    scale = 1e-3 * (0.5 + 2.0 * torch.rand((), generator=g).item())
    tv = scale * torch.randn(shape, generator=g)
    spikes = torch.rand(shape, generator=g) < 0.02
    return tv.add_(spikes * torch.randn(shape, generator=g), alpha=10 * scale)


def ensure_models(workdir: Path, seed: int, blocks: int, experts: int) -> tuple[Path, list[Path]]:
    return vit_models.ensure_models(workdir, seed, blocks, experts, _task_vector, {"version": SPEC_VERSION})


def reference_ta(base_path: Path, expert_paths: list[Path]) -> dict[str, torch.Tensor]:
    base = load_file(str(base_path))
    experts = [load_file(str(p)) for p in expert_paths]
    out = {}
    for name, theta0 in base.items():
        if not theta0.is_floating_point():
            out[name] = theta0
            continue
        theta0 = theta0.float()
        tau = torch.stack([e.pop(name).float() - theta0 for e in experts])
        out[name] = (theta0 + SCALING * tau.sum(dim=0)).to(base[name].dtype)
    return out


def reference_ties(base_path: Path, expert_paths: list[Path]) -> dict[str, torch.Tensor]:
    base = load_file(str(base_path))
    experts = [load_file(str(p)) for p in expert_paths]
    keys = [k for k, t in base.items() if t.is_floating_point()]  # the base file's key order
    theta0 = torch.cat([base[k].float().reshape(-1) for k in keys])
    d = theta0.numel()
    tau = torch.empty(len(experts), d)
    for i in range(len(experts)):
        tau[i] = torch.cat([experts[i][k].float().reshape(-1) for k in keys]) - theta0
        experts[i] = None  # the flat task vector replaces the expert
    rank = d - math.floor(DENSITY * d)  # keep |v| >= the rank-th smallest |v|
    for row in tau:
        threshold = torch.kthvalue(row.abs(), rank).values
        row.masked_fill_(row.abs() < threshold, 0.0)
    elected = torch.sign(tau.sum(dim=0))
    majority = torch.sign(elected.sum(dtype=torch.float64)).item()
    elected[elected == 0] = majority
    for row in tau:  # disjoint: keep only the entries that agree with the elected sign
        row.masked_fill_(torch.sign(row) != elected, 0.0)
    merged = theta0 + SCALING * tau.sum(dim=0)
    del tau
    out, offset = dict(base), 0
    for k in keys:
        n = base[k].numel()
        out[k] = merged[offset:offset + n].reshape(base[k].shape).to(base[k].dtype).clone()
        offset += n
    return out


def child(args: argparse.Namespace) -> None:
    """One measurement; prints a JSON line with wall time and this process's peak RSS."""
    workdir = Path(args.workdir)
    base, experts = workdir / "base.safetensors", [workdir / f"expert_{i}.safetensors" for i in range(args.experts)]
    if args.child == "engine":
        from mergeflow.merge import merge_checkpoints
        from mergeflow.content_cache import ContentCache
        method, params = METHODS[args.method]
        start = time.perf_counter()
        merge_checkpoints(method, str(base), [str(p) for p in experts], str(workdir / f"engine-{args.method}"),
                          params, device="cpu", overwrite=True, cache=ContentCache(workdir / "cache"))
    else:
        start = time.perf_counter()
        reference = {"ta": reference_ta, "ties": reference_ties}[args.method]
        save_file(reference(base, experts), str(workdir / f"reference-{args.method}.safetensors"))
    wall = time.perf_counter() - start
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    print(json.dumps({"wall_s": wall, "peak_rss": int(status["VmHWM"].split()[0]) * 1024}))


def measure(kind: str, method: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", kind, "--method", method, "--workdir", args.workdir,
           "--experts", str(args.experts)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{kind} {method} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(workdir: Path, method: str) -> tuple[int, int, float]:
    """(identical tensors, total tensors, max |engine - reference|) over every tensor."""
    from mergeflow.checkpoints import open_checkpoint
    from mergeflow.content_cache import ContentCache
    engine = open_checkpoint(str(workdir / f"engine-{method}"), cache=ContentCache(workdir / "cache"))
    identical, worst = 0, 0.0
    with engine, safe_open(str(workdir / f"reference-{method}.safetensors"), "pt") as reference:
        if set(engine.keys()) != set(reference.keys()):
            sys.exit(f"{method}: engine and reference hold different tensor names")
        for name in engine.keys():
            a, b = engine.get(name), reference.get_tensor(name)
            same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
            diff = float((a.double() - b.double()).abs().max()) if a.shape == b.shape and a.numel() else 0.0
            if not same:
                print(f"  {method}: {name} differs (max abs diff {diff:.3g})")
            identical, worst = identical + same, max(worst, diff)
    return identical, len(engine.keys()), worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=str(ROOT / "benchmarks" / "out" / "merge_memory"))
    parser.add_argument("--methods", default="ta,ties", help="comma-separated, from: " + ", ".join(METHODS))
    parser.add_argument("--skip-reference", action="store_true", help="measure the engine only")
    parser.add_argument("--child", choices=["engine", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := set(methods) - set(METHODS):
        parser.error(f"unknown method(s) {sorted(unknown)}; known: {', '.join(METHODS)}")

    workdir = Path(args.workdir)
    base, experts = ensure_models(workdir, args.seed, args.blocks, args.experts)
    from mergeflow.content_cache import ContentCache  # digest the inputs once, so no timed run pays for hashing
    for path in (base, *experts):
        ContentCache(workdir / "cache").fetch(str(path))
    rows, failed = [], False
    for method in methods:
        print(f"{method}: engine ...", flush=True)
        engine = measure("engine", method, args)
        reference, check = None, "skipped"
        if not args.skip_reference:
            print(f"{method}: reference ...", flush=True)
            reference = measure("reference", method, args)
            same, total, worst = compare(workdir, method)
            check = f"{'yes' if same == total else 'NO'} ({same}/{total}, max diff {worst:.3g})"
            failed |= same != total
        rows.append((method, engine, reference, check))
        shutil.rmtree(workdir / f"engine-{method}", ignore_errors=True)
        (workdir / f"reference-{method}.safetensors").unlink(missing_ok=True)

    print(f"\n{args.blocks} blocks, {args.experts} experts, seed {args.seed}; device cpu, "
          f"{torch.get_num_threads()} threads; peak RSS = child VmHWM, GB = 1e9 bytes")
    header = ("method", "engine s", "engine GB", "ref s", "ref GB", "RSS ratio", "identical")
    print("{:<7}{:>10}{:>11}{:>9}{:>9}{:>11}  {}".format(*header))
    for method, engine, reference, check in rows:
        ref = (f"{reference['wall_s']:.1f}", f"{reference['peak_rss'] / GB:.2f}",
               f"{reference['peak_rss'] / engine['peak_rss']:.1f}x") if reference else ("-", "-", "-")
        print("{:<7}{:>10.1f}{:>11.2f}{:>9}{:>9}{:>11}  {}".format(
            method, engine["wall_s"], engine["peak_rss"] / GB, *ref, check))
    for method, engine, _, _ in rows:
        peak, goal = engine["peak_rss"] / GB, GOALS_GB[method]
        print(f"goal: {method} engine peak RSS < {goal} GB: {'met' if peak < goal else 'MISSED'} ({peak:.2f} GB)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
