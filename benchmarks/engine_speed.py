"""Task Arithmetic, TIES, DARE, SLERP and DARE-TIES: Mergeflow's whole CLI beside mergekit 0.1.5 and FusionBench
0.2.33 (the first three; its code loaded here has no SLERP or DARE-TIES), same inputs.

Inputs, generated once from a seed and reused while their recorded description matches:
  vit    merge_memory.py's ViT-B/32-shaped visual tower (open_clip key names, fp32, single-file safetensors;
         12 blocks, ~88 M parameters) and 8 experts, in benchmarks/out/merge_memory/ (shared with merge_memory.py)
  llama  a Llama-shaped causal LM in the Hugging Face sharded layout (config.json, model.safetensors.index.json,
         bf16 shards; 16 layers, hidden 2048, intermediate 8192, vocab 32000, 32 heads, 8 KV heads: ~1.1 B
         parameters) and 4 experts (base + a seeded gaussian task vector), in benchmarks/out/engine_llama/
Methods: ta (theta_0 + 0.3 sum tau), ties (top 20% per task vector, elected signs, disjoint sum, lambda 0.3),
dare (drop 0.5 with rescale, lambda 0.3), slerp (the base and the first expert, t 0.5: mergekit's `slerp`) and
dare_ties (mergekit's `dare_ties`: keep 0.5 per tensor with L1 rescale, elected signs, weight 1, lambda 0.3).
Tools, each run a FRESH process timed by /usr/bin/time (wall time and peak RSS of the whole command: interpreter
start, imports, load, merge, write):
  mergeflow    `mergeflow merge --method ... --device cpu` (MERGEFLOW_CACHE holds the input digests, computed
               once before any timed run)
  mergekit     `mergekit-yaml CONFIG OUT`, mergekit 0.1.5 pip-installed with --no-deps (plus immutables, the one
               module it needs that the project venv lacks) into benchmarks/out/peers/mergekit, run by the project
               venv's Python; arithmetic in float32 (`dtype: float32`), output in the input dtype
  fusionbench  FusionBench 0.2.33's own code (state_dict_arithmetic, ties_merging_utils, dare/utils, loaded from its
               wheel by fusionbench_code.py) run as its algorithm classes run it: models loaded whole
               (safetensors load_file), task vectors as state dicts, the merged state dict written with safetensors
Then Mergeflow's output is compared tensor by tensor with each peer's. Prints a markdown table per input, Mergeflow's
Llama throughput with a projection to 7B x 8 experts, and the goals as met/missed lines. Exits 1 if a run failed.

    python benchmarks/engine_speed.py                  # full size (inputs: ~3 GB ViT, ~11 GB Llama)
    python benchmarks/engine_speed.py --blocks 2 --experts 3 --layers 2 --hidden 256 --intermediate 512 \\
        --vocab 1000 --llama-experts 2 --workdir /tmp/es/vit --llama-workdir /tmp/es/llama   # quick check
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

import fusionbench_code
import llama_models
import merge_memory
from engine_report import TOOLS, Run, goal_lines, print_table, print_throughput
from engine_peers import (DENSITY, DROP, GB, OUT, SCALING, SLERP_T, ensure_mergekit, experts_used,
                          fusionbench_child, fusionbench_skip, mergekit_command, mergekit_view)
from vit_models import model_spec

METHODS = ("ta", "ties", "dare", "slerp", "dare_ties")
MERGEFLOW = {"ta": ("task_arithmetic", {"scaling": SCALING}),
             "ties": ("ties", {"density": DENSITY, "scaling": SCALING, "merge": "sum"}),
             "dare": ("dare", {"drop_rate": DROP, "scaling": SCALING}),
             "slerp": ("slerp", {"t": SLERP_T}),
             "dare_ties": ("dare_ties", {"weight": 1.0, "density": 1 - DROP, "scaling": SCALING, "normalize": False,
                                         "rescale": True})}
RANDOM_MASKS = ("dare", "dare_ties")  # each tool draws its own masks: their outputs differ by design


@dataclass(frozen=True)
class Inputs:
    """One benchmark input: what each tool is given, and where its runs write."""

    kind: str  # "vit" or "llama"
    title: str
    base: Path  # a file or a model directory, as Mergeflow and FusionBench take it
    experts: tuple[Path, ...]
    mergekit_models: tuple[Path, ...]  # base first: model directories mergekit accepts
    scratch: Path  # outputs and mergekit configs
    cache: Path  # MERGEFLOW_CACHE
    dtype: str  # the inputs' dtype, mergekit's out_dtype
    mergeflow_shard: str | None
    mergekit_shard: str | None

    def files(self) -> list[Path]:
        """Every input file (the safetensors files and, for model directories, their JSON files)."""
        return [f for p in (self.base, *self.experts) for f in ([p] if p.is_file() else sorted(p.iterdir()))]

    def nbytes(self, method: str | None = None) -> int:
        """Bytes of safetensors input: every model's, or those `method` reads (SLERP: the base and one expert)."""
        models = (self.base, *self.experts) if method is None else (self.base, *experts_used(method, self.experts))
        return sum(f.stat().st_size for p in models for f in ([p] if p.is_file() else sorted(p.iterdir()))
                   if f.suffix == ".safetensors")


@dataclass(frozen=True)
class Comparison:
    """Mergeflow's output (a) against a peer's (b), over every tensor."""

    identical: bool = False
    merged: float = 0.0  # max ||a - b|| / ||b||
    update: float = 0.0  # max ||a - b|| / ||b - theta_0||
    problem: str | None = None  # the outputs do not hold the same tensors

    def describe(self, by_design: bool) -> str:
        if self.problem or self.identical:
            return self.problem or "bit-identical"
        if by_design:
            return f"differs by design; update rel. err {self.update:.1e} (sanity figure)"
        return f"max rel. err {self.merged:.1e} (update {self.update:.1e})"


# ---------------------------------------------------------------------------------------------------- inputs


def vit_inputs(args: argparse.Namespace) -> Inputs:
    """merge_memory.py's files; for mergekit, a directory per model with a config.json it can read (an unknown
    architecture: mergekit then infers the layout from the tensor names) and model.safetensors linked to the file."""
    workdir = Path(args.workdir).absolute()
    base, experts = merge_memory.ensure_models(workdir, args.seed, args.blocks, args.experts)
    scratch = workdir / "engine_speed"
    views = [mergekit_view(path, scratch / "mergekit-inputs" / path.stem) for path in (base, *experts)]
    params = sum(math.prod(shape) for _, shape in model_spec(args.blocks))
    title = (f"ViT-B/32-shaped visual tower: {args.blocks} blocks, {args.experts} experts, fp32, "
             f"{params / 1e6:.1f} M parameters per model")
    return Inputs("vit", title, base, tuple(experts), tuple(views), scratch, workdir / "cache", "float32", None, None)


def llama_inputs(args: argparse.Namespace) -> Inputs:
    """The Llama-shaped base and experts (`llama_models`)."""
    workdir = Path(args.llama_workdir).absolute()
    config = llama_models.llama_config(args.layers, args.hidden, args.intermediate, args.vocab)
    base, experts = llama_models.ensure_models(workdir, args.seed, config, args.llama_experts)
    params = sum(math.prod(shape) for _, shape in llama_models.llama_spec(config))
    title = (f"Llama-shaped causal LM (HF sharded layout, bf16): {args.layers} layers, hidden {args.hidden}, "
             f"intermediate {args.intermediate}, vocab {args.vocab}, {config['num_attention_heads']} heads, "
             f"{config['num_key_value_heads']} KV heads: {params / 1e9:.3f} B parameters per model; "
             f"{args.llama_experts} experts")
    return Inputs("llama", title, base, tuple(experts), (base, *experts), workdir / "engine_speed",
                  workdir / "cache", "bfloat16", "2GB", "1B")  # mergekit's shard size counts parameters


# ---------------------------------------------------------------------------------------------------- tools


def mergeflow_command(inputs: Inputs, method: str, out: Path, device: str) -> tuple[list[str], dict[str, str]]:
    name, params = MERGEFLOW[method]
    cmd = [str(Path(sys.executable).with_name("mergeflow")), "merge", "--method", name, "--base", str(inputs.base),
           *[a for e in experts_used(method, inputs.experts) for a in ("--expert", str(e))], "--out", str(out),
           "--overwrite",
           "--device", device, *[a for k, v in params.items() for a in ("--param", f"{k}={v}")]]
    if inputs.mergeflow_shard:
        cmd += ["--shard-size", inputs.mergeflow_shard]
    return cmd, {"MERGEFLOW_CACHE": str(inputs.cache)}


def command(tool: str, inputs: Inputs, method: str, out: Path, peers: Path, device: str
            ) -> tuple[list[str], dict[str, str]]:
    """The command line of one run and the environment variables it adds."""
    if tool == "mergeflow":
        return mergeflow_command(inputs, method, out, device)
    if tool == "mergekit":
        return mergekit_command(inputs, method, out, peers)
    return [sys.executable, __file__, "--child", method, str(inputs.base), str(out), *map(str, inputs.experts)], {}


def timed(cmd: list[str], env: dict[str, str], log: Path) -> Run:
    """Wall time and peak RSS of one fresh process, from /usr/bin/time; its output goes to `log`."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as measured, log.open("w") as out:
        done = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", measured.name, *cmd], stdout=out,
                              stderr=subprocess.STDOUT, env={**os.environ, **env})
        wall, peak_kb = measured.read().split()[-2:]
    if done.returncode != 0:
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        return Run(float(wall), int(peak_kb) * 1024, f"failed ({lines[-1][:160] if lines else 'no output'})")
    return Run(float(wall), int(peak_kb) * 1024)


# ---------------------------------------------------------------------------------------------------- comparison


@contextlib.contextmanager
def open_tensors(path: Path) -> Iterator[dict[str, Callable[[], torch.Tensor]]]:
    """{name: loader} over a safetensors file or every safetensors file of a directory."""
    with contextlib.ExitStack() as stack:
        loaders = {}
        for file in [path] if path.is_file() else sorted(path.glob("*.safetensors")):
            handle = stack.enter_context(safe_open(str(file), "pt"))
            loaders.update({k: functools.partial(handle.get_tensor, k) for k in handle.keys()})
        yield loaders


def compare(ours: Path, theirs: Path, base: Path) -> Comparison:
    """Tensor by tensor: equal (torch.equal, same dtype), and the largest relative Frobenius errors."""
    with open_tensors(ours) as a, open_tensors(theirs) as b, open_tensors(base) as theta0:
        if a.keys() != b.keys():
            return Comparison(problem=f"different tensor names ({len(a.keys() ^ b.keys())} not in both)")
        identical, merged, update = True, 0.0, 0.0
        for name in a:
            x, y = a[name](), b[name]()
            if x.shape != y.shape:
                return Comparison(problem=f"different shapes ({name})")
            identical &= x.dtype == y.dtype and torch.equal(x, y)
            diff = float((x.double() - y.double()).norm())
            merged = max(merged, diff / max(float(y.double().norm()), 1e-30))
            moved = float((y.double() - theta0[name]().double()).norm())
            update = max(update, diff / moved if moved else (math.inf if diff else 0.0))
    return Comparison(identical, merged, update)


# ---------------------------------------------------------------------------------------------------- benchmark


def benchmark(inputs: Inputs, args: argparse.Namespace, peers: Path
              ) -> tuple[dict[tuple[str, str], list[Run]], dict[tuple[str, str], str]]:
    """Every (method, tool) run `args.rounds` times, the tools' order reversed every other round; Mergeflow's
    first-round output compared with each peer's. Outputs are deleted once used."""
    inputs.scratch.mkdir(parents=True, exist_ok=True)
    runs: dict[tuple[str, str], list[Run]] = {}
    comparisons: dict[tuple[str, str], str] = {}
    for round_ in range(args.rounds):
        for method in args.methods:
            outs = {}
            for tool in args.tools if round_ % 2 == 0 else args.tools[::-1]:
                out = inputs.scratch / f"{tool}-{method}"
                shutil.rmtree(out, ignore_errors=True)
                skip = fusionbench_skip(inputs, method) if tool == "fusionbench" else None
                run = Run(error=skip) if skip else timed(*command(tool, inputs, method, out, peers, args.device),
                                                         inputs.scratch / f"{tool}-{method}.log")
                runs.setdefault((method, tool), []).append(run)
                print(f"{inputs.kind} {method} round {round_ + 1} {tool}: " + (
                    run.error or f"{run.wall_s:.1f} s, {run.peak / GB:.2f} GB"), flush=True)
                if run.error is None:
                    outs[tool] = out
                else:
                    shutil.rmtree(out, ignore_errors=True)
            if round_ == 0 and "mergeflow" in outs:
                for tool in ("fusionbench", "mergekit"):
                    if tool in outs:  # DARE's masks, mergekit's per-tensor TIES: not the same merge
                        by_design = method in RANDOM_MASKS or (method, tool) == ("ties", "mergekit")
                        comparisons[method, tool] = compare(outs["mergeflow"], outs[tool], inputs.base).describe(
                            by_design)
            for out in outs.values():
                shutil.rmtree(out, ignore_errors=True)
    return runs, comparisons


def digest(inputs: Inputs) -> None:
    """Mergeflow's content digests of every input file, computed once so that no timed run pays for hashing."""
    from mergeflow.content_cache import ContentCache

    cache = ContentCache(inputs.cache)
    for file in inputs.files():
        cache.fetch(str(file))
    print(f"{inputs.kind}: input digests computed before timing (MERGEFLOW_CACHE={inputs.cache}); "
          "inputs read from the page cache in every run", flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["vit", "llama"], help="one input (default: both)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from: " + ", ".join(METHODS))
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma-separated, from: " + ", ".join(TOOLS))
    parser.add_argument("--rounds", type=int, default=1, help="runs of every (method, tool), tools alternating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blocks", type=int, default=12, help="ViT residual blocks")
    parser.add_argument("--experts", type=int, default=8, help="ViT experts")
    parser.add_argument("--layers", type=int, default=16, help="Llama decoder layers")
    parser.add_argument("--hidden", type=int, default=2048, help="Llama hidden size (heads: hidden / 64)")
    parser.add_argument("--intermediate", type=int, default=8192, help="Llama MLP size")
    parser.add_argument("--vocab", type=int, default=32000, help="Llama vocabulary")
    parser.add_argument("--llama-experts", type=int, default=4)
    parser.add_argument("--workdir", default=str(OUT / "merge_memory"), help="ViT inputs (shared with merge_memory.py)")
    parser.add_argument("--llama-workdir", default=str(OUT / "engine_llama"), help="Llama inputs")
    parser.add_argument("--device", default="cpu", help="Mergeflow's device (cuda: the GPU path; the throughput "
                        "lines then give its GB/s of input); the peers run on the CPU")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # METHOD BASE OUT EXPERT...: FusionBench run
    args = parser.parse_args()
    if args.child:
        return args
    for name, known in (("methods", METHODS), ("tools", TOOLS)):
        chosen = [x.strip() for x in getattr(args, name).split(",") if x.strip()]
        if unknown := sorted(set(chosen) - set(known)):
            parser.error(f"unknown {name} {unknown}; choose from {', '.join(known)}")
        setattr(args, name, [x for x in known if x in chosen])
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        method, base, out, *experts = args.child
        return fusionbench_child(method, base, out, experts)
    peers = ensure_mergekit() if "mergekit" in args.tools else OUT / "peers" / "mergekit"
    if "fusionbench" in args.tools:
        fusionbench_code.wheel_path()
    inputs = [make(args) for kind, make in (("vit", vit_inputs), ("llama", llama_inputs))
              if args.only in (None, kind)]
    for each in inputs:
        digest(each)
    results = [(each, *benchmark(each, args, peers)) for each in inputs]
    print(f"\nCPU, {os.cpu_count()} cores; torch {torch.__version__}; peak RSS and wall time from /usr/bin/time; "
          f"{args.rounds} round(s)")
    goals, failed = [], False
    for each, runs, comparisons in results:
        print_table(each, args, runs, comparisons)
        if each.kind == "llama" and "mergeflow" in args.tools:
            print()
            print_throughput(each, args, runs)
        goals += goal_lines(each, args, runs)
        failed |= any(r.error and r.error.startswith("failed") for rs in runs.values() for r in rs)
    if goals:
        print("\nGoals (stated for the full size: ViT 12 blocks x 8 experts, Llama ~1.1 B x 4 experts; Mergeflow: "
              "fastest round, largest peak):\n" + "\n".join(goals))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
