"""The peers of engine_speed.py: mergekit 0.1.5, pip-installed without dependencies into its own folder and run by
its YAML CLI, and FusionBench 0.2.33's own merge code (fusionbench_code.py) run as its algorithm classes run it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

import fusionbench_code

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
GB = 1e9
SCALING, DENSITY, DROP, SLERP_T = 0.3, 0.2, 0.5, 0.5
# method -> (mergekit's method, its per-model parameters, its global parameters besides lambda 0.3 and normalize off)
MERGEKIT = {"ta": ("task_arithmetic", {"weight": 1.0}, {}),
            "ties": ("ties", {"weight": 1.0, "density": DENSITY}, {}),
            "dare": ("dare_linear", {"weight": 1.0, "density": 1 - DROP}, {}),  # keeps `density` (rescale: default on)
            "slerp": ("slerp", {}, {"t": SLERP_T}),
            "dare_ties": ("dare_ties", {"weight": 1.0, "density": 1 - DROP}, {"rescale": True})}
EXPERTS_USED = {"slerp": 1}  # SLERP merges the base and the first expert; the others take every expert
PEER_PACKAGES = ("mergekit==0.1.5", "immutables==0.21")
# The venv's torchvision wheel cannot load beside the CPU torch (see mergeflow/compat.py) and mergekit does not use
# it: hidden, transformers sees it as absent.
MERGEKIT_MAIN = ("import runpy, sys; sys.modules['torchvision'] = None; sys.argv[0] = 'mergekit-yaml'; "
                 "runpy.run_module('mergekit.scripts.run_yaml', run_name='__main__')")
# FusionBench's peak RSS: (a * experts + b) model sizes + the interpreter, by input dtype (measured with
# /usr/bin/time on small inputs with 2 and 6 experts, rounded up; TIES's bool masks weigh more beside bf16).
FUSIONBENCH_MODELS = {"float32": {"ta": (0, 6), "ties": (8, 3), "dare": (2.5, 3)},
                      "bfloat16": {"ta": (0, 6), "ties": (11, 3), "dare": (2.5, 3)}}
INTERPRETER_BYTES = 0.3e9


def ensure_mergekit() -> Path:
    """mergekit 0.1.5 and immutables, pip-installed without dependencies into their own folder (never torch)."""
    target = OUT / "peers" / "mergekit"
    if not all((target / f"{p.replace('==', '-')}.dist-info").exists() for p in PEER_PACKAGES):
        print(f"installing {', '.join(PEER_PACKAGES)} into {target.relative_to(ROOT)} (--no-deps)", flush=True)
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade",
                               "--target", str(target), *PEER_PACKAGES], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"could not install {PEER_PACKAGES}:\n{done.stderr[-4000:]}")
    return target


def experts_used(method: str, experts: tuple) -> tuple:
    return experts[:EXPERTS_USED.get(method, len(experts))]


def mergekit_command(inputs: Any, method: str, out: Path, peers: Path) -> tuple[list[str], dict[str, str]]:
    """A config per method (JSON, which YAML reads): weight 1 per expert, lambda 0.3, normalize off, so that the
    merge is theta_0 + 0.3 * sum of the (sparsified) task vectors; SLERP: the base and the first expert, t 0.5."""
    name, per_model, shared = MERGEKIT[method]
    base, *experts = inputs.mergekit_models
    models = [{"model": str(e), "parameters": dict(per_model)} for e in experts_used(method, tuple(experts))]
    parameters = {"lambda": SCALING, "normalize": False, **shared}
    if name == "slerp":  # mergekit's slerp: both models listed, t its one parameter
        models, parameters = [{"model": str(base)}, *({"model": m["model"]} for m in models)], dict(shared)
    config = {"merge_method": name, "base_model": str(base), "models": models, "parameters": parameters,
              "dtype": "float32", "out_dtype": inputs.dtype}
    path = inputs.scratch / f"mergekit-{method}.yml"
    path.write_text(json.dumps(config, indent=2))
    cmd = [sys.executable, "-c", MERGEKIT_MAIN, str(path), str(out), "--no-copy-tokenizer", "--random-seed", "0"]
    if inputs.mergekit_shard:
        cmd += ["--out-shard-size", inputs.mergekit_shard]
    return cmd, {"PYTHONPATH": str(peers), "HF_HUB_OFFLINE": "1"}


def fusionbench_skip(inputs: Any, method: str) -> str | None:
    """Why FusionBench is not run (a method fusionbench_code.py does not load; every model in memory: its
    estimated peak past 80% of MemTotal), or None."""
    if method not in FUSIONBENCH_MODELS[inputs.dtype]:
        return "not run (fusionbench_code.py loads no such method)"
    a, b = FUSIONBENCH_MODELS[inputs.dtype][method]
    model = inputs.nbytes() / (1 + len(inputs.experts))
    estimate = (a * len(inputs.experts) + b) * model + INTERPRETER_BYTES
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    total = int(meminfo["MemTotal"].split()[0]) * 1024
    if estimate > 0.8 * total:
        return (f"skipped: every model in memory, est. {estimate / GB:.0f} GB ({a:g} x experts + {b} model sizes) "
                f"> 80% of MemTotal {total / GB:.0f} GB")
    return None


def fusionbench_child(method: str, base: str, out: str, experts: list[str]) -> None:
    merged = fusionbench_code.merge_as_algorithms(method, Path(base), [Path(e) for e in experts], SCALING, DENSITY,
                                                  DROP)
    Path(out).mkdir(parents=True)
    save_file(merged, str(Path(out) / "model.safetensors"), metadata={"format": "pt"})


def mergekit_view(weights: Path, directory: Path) -> Path:
    """`directory` made a model directory mergekit reads for a ViT-shaped weights file: a config.json with an
    architecture it does not know (so it infers the layers from the names) and a link to the weights."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(
        {"architectures": ["OpenCLIPVisionTower"], "model_type": "clip_vision_model"}))
    (directory / "model.safetensors").unlink(missing_ok=True)
    (directory / "model.safetensors").symlink_to(weights)
    return directory
