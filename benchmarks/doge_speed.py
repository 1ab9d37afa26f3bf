"""DOGE TA: mergeflow's batched closed-form implementation against a straightforward per-layer autograd reference.

Generates, from a seed, a ViT-B/32-shaped visual tower (open_clip key names, see vit_models.py) and N experts whose
linear-weight task vectors are structured: a few dominant rank-1 directions of their own, a few directions shared
by every expert (with expert-specific strengths), plus dense gaussian noise; other tensors get noise only. Then,
each in a FRESH subprocess so that the peak RSS (the child's VmHWM) belongs to one run:
  doge_ta    mergeflow.merge_checkpoints(method="doge_ta", device=--device) on the whole model
  reference  algorithms.md 1.1 as the reference code does it: every model loaded in memory; one layer after
             another: per-task thin SVDs, the d_out x d_out projector P = Q Q^T, torch autograd on the loss,
             g - P g, torch.optim.Adam; masks from the top-30% of the original task vectors over all selected
             layers; merge. `--reference-blocks K` optimises only the first K blocks' layers: its full time is
             then extrapolated from the measured per-layer times of each shape (and printed as such).
Prints wall times, peak memory, the speed ratio and the relative Frobenius error per tensor, on the merged
tensor (the goal: <= 1e-4) and on its update theta - theta_0 (stricter).

    python benchmarks/doge_speed.py --reference-blocks 2     # whole model; reference on 2 blocks (~15 min)
    python benchmarks/doge_speed.py --blocks 1 --steps 50    # quick check
    python benchmarks/doge_speed.py --device cuda            # on a GPU
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

ETA, DIVISOR, KEEP, LR = 0.07, 6, 0.3, 1e-4
OWN_DIRECTIONS, SHARED_DIRECTIONS = 4, 2
SPEC_VERSION = 1  # bump when the generator below changes
GB = 1e9


def structured_task_vector(seed: int, expert: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Dense noise of a per-tensor scale; for 2-D weights, plus rank-1 directions several times stronger than
    the noise's largest singular value: OWN_DIRECTIONS per expert and SHARED_DIRECTIONS common to all experts."""
    g = generator(seed, "expert", expert, name)
    scale = 1e-3 * (0.5 + 2.0 * torch.rand((), generator=g).item())
    tv = scale * torch.randn(shape, generator=g)
    if len(shape) != 2 or not name.endswith("weight"):
        return tv
    rows, cols = shape
    noise_top = scale * (math.sqrt(rows) + math.sqrt(cols))
    shared = generator(seed, "shared", name)
    for source, count, low in ((g, OWN_DIRECTIONS, 2.0), (shared, SHARED_DIRECTIONS, 3.0)):
        u = torch.randn(rows, count, generator=source)
        v = torch.randn(count, cols, generator=source)
        strength = noise_top * (low + 4.0 * torch.rand(count, generator=g))
        tv.addmm_(u / u.norm(dim=0) * strength, v / v.norm(dim=1, keepdim=True))
    return tv


def selected_keys(shapes: dict[str, list[int]]) -> list[str]:
    """The linear weights, chosen here by name (2-D and ending in 'weight'), independently of mergeflow."""
    return [k for k, shape in shapes.items() if len(shape) == 2 and k.endswith("weight")]


def reference_layer(tau: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lambda [N], delta) of one layer's task vectors [N, d_out, d_in], per algorithms.md 1.1."""
    n, d_out, d_in = tau.shape
    r = min(d_out, d_in)
    lam = torch.stack([ETA / t.norm() for t in tau])
    bases = [torch.linalg.svd(t, full_matrices=False)[0][:, :r // n] for t in tau]
    q = torch.linalg.svd(torch.cat(bases, dim=1), full_matrices=False)[0][:, :r // DIVISOR]
    projector = q @ q.T
    delta = torch.zeros(d_out, d_in, dtype=tau.dtype, device=tau.device, requires_grad=True)
    adam = torch.optim.Adam([delta], lr=LR)
    for _ in range(steps):
        adam.zero_grad()
        merged = sum(lam[i] * (tau[i] + delta) for i in range(n))
        loss = sum(((tau[j] * (tau[j] - merged)).sum(dim=1) ** 2).sum() for j in range(n))
        loss.backward()
        with torch.no_grad():
            delta.grad -= projector @ delta.grad
        adam.step()
    return lam, delta.detach()


def run_reference(base_path: Path, expert_paths: list[Path], out: Path, blocks: int | None, steps: int,
                  device: str) -> dict[str, object]:
    start = time.perf_counter()
    base = load_file(str(base_path))
    experts = [load_file(str(p)) for p in expert_paths]
    keys = selected_keys({k: list(t.shape) for k, t in base.items()})
    thresholds = []
    for expert in experts:
        flat = torch.cat([(expert[k] - base[k]).reshape(-1) for k in keys]).abs()
        thresholds.append(float(flat.kthvalue(flat.numel() - math.floor(KEEP * flat.numel())).values))
        del flat
    todo = [k for k in keys if blocks is None or int(k.split(".")[2]) < blocks]
    setup, merged, layer_seconds = time.perf_counter() - start, {}, {}
    for k in todo:
        started = time.perf_counter()
        theta0 = base[k].to(device)
        tau = torch.stack([e[k].to(device) - theta0 for e in experts])
        lam, delta = reference_layer(tau, steps)
        update = sum(lam[i] * (tau[i].abs() >= thresholds[i]) * (tau[i] + delta) for i in range(len(experts)))
        merged[k] = (theta0 + update).cpu()
        layer_seconds[k] = time.perf_counter() - started
    save_file(merged, str(out))
    shapes = {k: list(base[k].shape) for k in keys}
    return {"setup_s": setup, "layer_s": layer_seconds, "shapes": shapes, "thresholds": thresholds}


def child(args: argparse.Namespace) -> None:
    """One measurement; prints a JSON line with wall time, this process's peak RSS and any extra figures."""
    workdir = Path(args.workdir)
    base, experts = workdir / "base.safetensors", [workdir / f"expert_{i}.safetensors" for i in range(args.experts)]
    start, extra = time.perf_counter(), {}
    if args.child == "baseline":
        import mergeflow.merge  # noqa: F401  (the interpreter with torch and mergeflow loaded, nothing else)
    elif args.child == "doge":
        from mergeflow.merge import merge_checkpoints
        from mergeflow.content_cache import ContentCache
        merge_checkpoints("doge_ta", str(base), [str(p) for p in experts], str(workdir / "doge"),
                          {"eta": ETA, "subspace_divisor": DIVISOR, "keep": KEEP, "lr": LR, "steps": args.steps,
                           **({} if args.group_mb is None else {"group_mb": args.group_mb})},
                          device=args.device, overwrite=True, cache=ContentCache(workdir / "cache"))
    else:
        extra = run_reference(base, experts, workdir / "reference.safetensors", args.reference_blocks, args.steps,
                              args.device)
    wall = time.perf_counter() - start
    if args.device.startswith("cuda"):
        extra["gpu_peak"] = torch.cuda.max_memory_allocated()
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    print(json.dumps({"wall_s": wall, "peak_rss": int(status["VmHWM"].split()[0]) * 1024, **extra}))


def measure(kind: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--workdir", args.workdir, "--experts", str(args.experts),
           "--steps", str(args.steps), "--device", args.device]
    if args.group_mb is not None:
        cmd += ["--group-mb", str(args.group_mb)]
    if args.reference_blocks is not None:
        cmd += ["--reference-blocks", str(args.reference_blocks)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{kind} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(workdir: Path) -> tuple[int, float, float, str, bool]:
    """(tensors compared, max relative error of the merged tensors, of their updates, the worst tensor by update,
    whether every tensor outside the selection is exactly theta_0)."""
    from mergeflow.checkpoints import open_checkpoint
    from mergeflow.content_cache import ContentCache
    doge = open_checkpoint(str(workdir / "doge"), cache=ContentCache(workdir / "cache"))
    worst_merged, worst_update, worst_name = 0.0, 0.0, ""
    with doge, safe_open(str(workdir / "reference.safetensors"), "pt") as ref, \
            safe_open(str(workdir / "base.safetensors"), "pt") as base:
        for name in ref.keys():
            a, b, theta0 = doge.get(name).double(), ref.get_tensor(name).double(), base.get_tensor(name).double()
            worst_merged = max(worst_merged, float((a - b).norm() / b.norm()))
            update_error = float((a - b).norm() / (b - theta0).norm())
            if update_error > worst_update:
                worst_update, worst_name = update_error, name
        linear = set(selected_keys({k: base.get_slice(k).get_shape() for k in base.keys()}))
        untouched = all(torch.equal(doge.get(k), base.get_tensor(k)) for k in base.keys() if k not in linear)
        compared = len(ref.keys())
    return compared, worst_merged, worst_update, worst_name, untouched


def float64_check(workdir: Path, experts: int, name: str, steps: int, thresholds: list[float]) -> tuple[float, float]:
    """Relative errors of doge_ta's and the reference's updates of layer `name` against the reference run in
    float64 (masks from the same thresholds): how far each fp32 implementation is from the exact math."""
    from mergeflow.checkpoints import open_checkpoint
    from mergeflow.content_cache import ContentCache
    with safe_open(str(workdir / "base.safetensors"), "pt") as base:
        theta0 = base.get_tensor(name)
    taus = []
    for i in range(experts):
        with safe_open(str(workdir / f"expert_{i}.safetensors"), "pt") as expert:
            taus.append(expert.get_tensor(name) - theta0)
    tau = torch.stack(taus)
    lam, delta = reference_layer(tau.double(), steps)
    exact = sum(lam[i] * (tau[i].abs() >= thresholds[i]) * (tau[i].double() + delta) for i in range(experts))
    with open_checkpoint(str(workdir / "doge"), cache=ContentCache(workdir / "cache")) as doge:
        ours = doge.get(name).double() - theta0.double()
    with safe_open(str(workdir / "reference.safetensors"), "pt") as ref:
        theirs = ref.get_tensor(name).double() - theta0.double()
    return float((ours - exact).norm() / exact.norm()), float((theirs - exact).norm() / exact.norm())


def memory_bound(blocks: int, experts: int, group_mb: float) -> tuple[float, float]:
    """(bytes of the experts' selected layers in fp32, bytes of the largest working set of one layer group: the
    larger of (a) the group's task vectors [G, N, d_out, d_in], ten [G, d_out, d_in] buffers (base, merged,
    delta, gradient, two Adam moments, temporaries) and one tensor's [N, d_out, d_in] while stacking, and (b) the
    streaming top-k pass of `prepare`, about six [N, d_out, d_in] temporaries per tensor)."""
    spec = dict(vit_models.model_spec(blocks))
    shapes = [spec[k] for k in selected_keys({k: list(s) for k, s in spec.items()})]
    selected = experts * 4 * sum(math.prod(s) for s in shapes)
    working = 0.0
    for shape in set(shapes):
        numel = math.prod(shape)
        group = min(shapes.count(shape), max(1, int(group_mb * 1e6 // (experts * 4 * numel))))
        working = max(working, 4 * numel * (group * (experts + 10) + experts), 6 * experts * 4 * numel)
    return selected, working


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=400, help="Adam steps per layer (both implementations)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (both implementations)")
    parser.add_argument("--group-mb", type=float, help="doge_ta's group_mb (default: the method's, by device)")
    parser.add_argument("--reference-blocks", type=int, help="optimise only the first K blocks in the reference")
    parser.add_argument("--skip-reference", action="store_true", help="measure doge_ta only")
    parser.add_argument("--workdir", default=str(ROOT / "benchmarks" / "out" / "doge_speed"))
    parser.add_argument("--child", choices=["baseline", "doge", "reference"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.reference_blocks is not None and not 0 < args.reference_blocks <= args.blocks:
        parser.error("--reference-blocks must be between 1 and --blocks")

    workdir = Path(args.workdir)
    base, experts = vit_models.ensure_models(
        workdir, args.seed, args.blocks, args.experts, structured_task_vector,
        {"version": SPEC_VERSION, "generator": "structured"})
    from mergeflow.content_cache import ContentCache  # digest the inputs once, so no timed run pays for hashing
    for path in (base, *experts):
        ContentCache(workdir / "cache").fetch(str(path))
    baseline = measure("baseline", args)
    print("doge_ta ...", flush=True)
    doge = measure("doge", args)
    reference = None
    if not args.skip_reference:
        print("reference ...", flush=True)
        reference = measure("reference", args)

    threads = f"{torch.get_num_threads()} threads" if args.device == "cpu" else args.device
    print(f"\n{args.blocks} blocks, {args.experts} experts, seed {args.seed}, {args.steps} steps; device "
          f"{args.device}, {threads}; peak RSS = child VmHWM, GB = 1e9 bytes")
    print(f"doge_ta    {doge['wall_s']:8.1f} s  peak RSS {doge['peak_rss'] / GB:.2f} GB"
          + (f"  GPU peak {doge['gpu_peak'] / GB:.2f} GB" if "gpu_peak" in doge else ""))
    from mergeflow.methods import build_method
    group_mb = build_method("doge_ta", {"group_mb": args.group_mb}).grouping(
        {"selected": []}, torch.device(args.device))[1] / 1e6
    selected, working = memory_bound(args.blocks, args.experts, group_mb)
    bound = selected + working + baseline["peak_rss"]
    print(f"memory bound: experts' selected layers {selected / GB:.2f} GB + one group's working set "
          f"{working / GB:.2f} GB + the interpreter with torch {baseline['peak_rss'] / GB:.2f} GB = {bound / GB:.2f} GB:"
          f" {'met' if doge['peak_rss'] <= bound else 'MISSED'}")
    if reference is None:
        return
    layer_s, shapes = reference["layer_s"], reference["shapes"]
    measured = reference["setup_s"] + sum(layer_s.values())
    per_shape: dict[str, list[float]] = {}
    for k, seconds in layer_s.items():
        per_shape.setdefault(str(shapes[k]), []).append(seconds)
    full = reference["setup_s"] + sum(sum(v) / len(v) for k in shapes for v in [per_shape[str(shapes[k])]])
    done_blocks = args.blocks if args.reference_blocks is None else args.reference_blocks
    label = "measured" if done_blocks == args.blocks else (
        f"EXTRAPOLATED from {done_blocks} of {args.blocks} blocks ({measured:.1f} s measured)")
    print(f"reference  {full:8.1f} s  peak RSS {reference['peak_rss'] / GB:.2f} GB"
          + (f"  GPU peak {reference['gpu_peak'] / GB:.2f} GB" if "gpu_peak" in reference else "") + f"  [{label}]")
    for shape, seconds in sorted(per_shape.items()):
        print(f"  reference per layer {shape}: {sum(seconds) / len(seconds):.1f} s (x{len(seconds)} measured)")
    ratio = full / doge["wall_s"]
    goal = 20.0 if args.device.startswith("cuda") else 5.0
    print(f"speed-up   {ratio:.1f}x (goal >= {goal:.0f}x): {'met' if ratio >= goal else 'MISSED'}")
    compared, merged_error, update_error, worst, untouched = compare(workdir)
    print(f"max relative Frobenius error over {compared} optimised tensors: merged tensor {merged_error:.2e} "
          f"(goal <= 1e-4: {'met' if merged_error <= 1e-4 else 'MISSED'}), update theta - theta_0 "
          f"{update_error:.2e} ({worst})")
    probe = "transformer.resblocks.0.attn.out_proj.weight"
    ours, theirs = float64_check(workdir, args.experts, probe, args.steps, reference["thresholds"])
    print(f"vs the reference run in float64 on {probe}: update error doge_ta {ours:.2e}, reference {theirs:.2e}")
    print(f"tensors outside the selection equal theta_0: {'yes' if untouched else 'NO'}")
    shutil.rmtree(workdir / "doge", ignore_errors=True)
    (workdir / "reference.safetensors").unlink(missing_ok=True)
    sys.exit(0 if untouched and merged_error <= 1e-4 else 1)


if __name__ == "__main__":
    main()
