"""The inputs of mergekit_parity.py: a tiny Llama and a ViT-shaped tower (base + experts whose task vectors share a
component, so elections and angles are not trivial), generated from a seed and reused while their description
matches."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

import llama_models
import vit_models
from engine_peers import mergekit_view
from vit_models import generator

SPEC_VERSION = 1
EXPERTS = 3
LLAMA = {"layers": 4, "hidden": 128, "intermediate": 256, "vocab": 1000}
VIT_BLOCKS = 2


def shared_task_vector(seed: int, expert: int, name: str, shape: tuple[int, ...], scale: float,
                       kind: str) -> torch.Tensor:
    """std (0.5-2.5) x scale x (0.6 shared + 0.8 own): every pair of experts at cosine ~0.36 per tensor."""
    g = generator(seed, kind + "-expert", expert, name)
    std = scale * (0.5 + 2.0 * torch.rand((), generator=g).item())
    shared = torch.randn(shape, generator=generator(seed, kind + "-shared", name))
    return (0.6 * shared + 0.8 * torch.randn(shape, generator=g)) * std


def llama_set(workdir: Path, seed: int) -> tuple[Path, list[Path], str]:
    """A tiny fp32 LlamaForCausalLM base and EXPERTS experts: one model.safetensors and config.json each."""
    config = {**llama_models.llama_config(**LLAMA), "torch_dtype": "float32"}
    wanted = {"version": SPEC_VERSION, "seed": seed, "config": config, "experts": EXPERTS}
    base, experts = workdir / "base", [workdir / f"expert_{i}" for i in range(EXPERTS)]
    if _stale(workdir, wanted):
        spec = llama_models.llama_spec(config)
        for index, directory in [(None, base), *enumerate(experts)]:
            tensors = {}
            for name, shape in spec:
                norm = name.endswith("norm.weight")
                theta = (1.0 if norm else 0.0) + 0.02 * torch.randn(shape, generator=generator(seed, "llama", name))
                if index is not None:
                    theta += shared_task_vector(seed, index, name, shape, 0.05 * (1.0 if norm else 0.02), "llama")
                tensors[name] = theta
            directory.mkdir(parents=True)
            save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
            (directory / "config.json").write_text(json.dumps(config, indent=2))
        (workdir / "models.json").write_text(json.dumps(wanted))
    params = sum(math.prod(s) for _, s in llama_models.llama_spec(config))
    title = (f"tiny LlamaForCausalLM, fp32: {LLAMA['layers']} layers, hidden {LLAMA['hidden']}, intermediate "
             f"{LLAMA['intermediate']}, vocab {LLAMA['vocab']} ({params / 1e6:.2f} M parameters); base + {EXPERTS} "
             "experts")
    return base, experts, title


def vit_set(workdir: Path, seed: int) -> tuple[Path, list[Path], str]:
    """vit_models.py's tower (VIT_BLOCKS blocks) with shared-component task vectors, as model directories: for
    mergekit a config.json with an architecture it does not know (it then infers the layout from the names)."""
    def task_vector(seed: int, expert: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return shared_task_vector(seed, expert, name, shape, 1e-3, "vit")

    files = workdir / "files"
    wanted = {"version": SPEC_VERSION, "generator": "mergekit_parity", "experts": EXPERTS}
    base_file, expert_files = vit_models.ensure_models(files, seed, VIT_BLOCKS, EXPERTS, task_vector, wanted)
    dirs = [mergekit_view(path, workdir / path.stem) for path in (base_file, *expert_files)]
    params = sum(math.prod(s) for _, s in vit_models.model_spec(VIT_BLOCKS))
    title = (f"ViT-B/32-shaped visual tower (vit_models.py, open_clip names), fp32: {VIT_BLOCKS} blocks "
             f"({params / 1e6:.1f} M parameters); base + {EXPERTS} experts")
    return dirs[0], dirs[1:], title


def _stale(workdir: Path, wanted: dict) -> bool:
    """Whether the models in `workdir` must be (re)generated; clears them if so."""
    record = workdir / "models.json"
    if record.exists() and json.loads(record.read_text()) == wanted:
        return False
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    return True


# ---------------------------------------------------------------------------------------------------- cases
