"""Seeded ViT-B/32-shaped models for the benchmarks: open_clip's visual-tower key names and shapes, a base model
and N experts (base + a task vector from a given generator), each a single-file safetensors, regenerated only
when the recorded description changes."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

WIDTH, MLP, PATCH, TOKENS, EMBED = 768, 3072, 32, 50, 512

TaskVector = Callable[[int, int, str, tuple[int, ...]], torch.Tensor]  # (seed, expert, name, shape) -> tensor


def model_spec(blocks: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of open_clip's ViT-B/32 visual tower (with `blocks` residual blocks)."""
    spec = [("conv1.weight", (WIDTH, 3, PATCH, PATCH)), ("class_embedding", (WIDTH,)),
            ("positional_embedding", (TOKENS, WIDTH)), ("ln_pre.weight", (WIDTH,)), ("ln_pre.bias", (WIDTH,))]
    for i in range(blocks):
        p = f"transformer.resblocks.{i}."
        spec += [(p + "ln_1.weight", (WIDTH,)), (p + "ln_1.bias", (WIDTH,)),
                 (p + "attn.in_proj_weight", (3 * WIDTH, WIDTH)), (p + "attn.in_proj_bias", (3 * WIDTH,)),
                 (p + "attn.out_proj.weight", (WIDTH, WIDTH)), (p + "attn.out_proj.bias", (WIDTH,)),
                 (p + "ln_2.weight", (WIDTH,)), (p + "ln_2.bias", (WIDTH,)),
                 (p + "mlp.c_fc.weight", (MLP, WIDTH)), (p + "mlp.c_fc.bias", (MLP,)),
                 (p + "mlp.c_proj.weight", (WIDTH, MLP)), (p + "mlp.c_proj.bias", (WIDTH,))]
    return spec + [("ln_post.weight", (WIDTH,)), ("ln_post.bias", (WIDTH,)), ("proj", (WIDTH, EMBED))]


def generator(*context: object) -> torch.Generator:
    """A CPU generator seeded from a context tuple (independent of generation order)."""
    digest = hashlib.sha256(repr(context).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def base_tensor(seed: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    g = generator(seed, "base", name)
    parts = name.split(".")
    is_norm_weight = len(parts) > 1 and parts[-2].startswith("ln") and parts[-1] == "weight"
    return (1.0 if is_norm_weight else 0.0) + 0.02 * torch.randn(shape, generator=g)


def ensure_models(workdir: Path, seed: int, blocks: int, experts: int, task_vector: TaskVector,
                  description: dict[str, object]) -> tuple[Path, list[Path]]:
    """Write base.safetensors and expert_<i>.safetensors, one model in memory at a time. `description` (with
    seed and blocks) is recorded in models.json; files made under another description are regenerated."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_file, wanted = workdir / "models.json", {**description, "seed": seed, "blocks": blocks}
    if spec_file.exists() and json.loads(spec_file.read_text()) != wanted:
        for old in workdir.glob("*.safetensors"):
            old.unlink()
    spec_file.write_text(json.dumps(wanted))
    spec = model_spec(blocks)
    base, paths = workdir / "base.safetensors", [workdir / f"expert_{i}.safetensors" for i in range(experts)]
    for index, path in [(None, base), *enumerate(paths)]:
        if path.exists():
            continue
        print(f"generating {path.name} ({sum(math.prod(s) for _, s in spec) / 1e6:.1f} M params)", flush=True)
        model = {n: base_tensor(seed, n, s) if index is None else base_tensor(seed, n, s).add_(
            task_vector(seed, index, n, s)) for n, s in spec}
        tmp = path.with_suffix(".tmp")
        save_file(model, str(tmp), metadata={"seed": str(seed), "expert": str(index)})
        tmp.rename(path)
        del model
    return base, paths
