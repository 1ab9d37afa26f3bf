"""Tiny random models for tests: real tensors, written as real checkpoint files by the fixtures."""

from __future__ import annotations

from pathlib import Path

import torch

from mergeflow.statistics import Statistics, save_statistics


def tiny_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A small transformer-like state dict: linear weights, a fused in_proj, biases, norms, an int buffer."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        "embeddings.word_embeddings.weight": torch.randn(11, 8, generator=g),
        "embeddings.position_ids": torch.arange(6).unsqueeze(0),
        "encoder.layer.0.attn.in_proj_weight": torch.randn(24, 8, generator=g),
        "encoder.layer.0.attn.in_proj_bias": torch.randn(24, generator=g),
        "encoder.layer.0.attn.out_proj.weight": torch.randn(8, 8, generator=g),
        "encoder.layer.0.ln_1.weight": torch.ones(8) + 0.1 * torch.randn(8, generator=g),
        "encoder.layer.0.mlp.fc1.weight": torch.randn(16, 8, generator=g),
        "encoder.layer.0.mlp.fc1.bias": torch.randn(16, generator=g),
        "encoder.layer.0.mlp.fc2.weight": torch.randn(8, 16, generator=g),
        "head.logit_scale": torch.tensor(2.5),
    }
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def make_experts(base: dict[str, torch.Tensor], n: int, seed: int = 1, scale: float = 0.05):
    experts = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed + i)
        experts.append({
            k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v
            for k, v in base.items()
        })
    return experts


def _gram(d: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(2 * d + 3, d, generator=g)
    return x.T @ x / len(x)


def random_statistics(base, n, kinds=("gram_in", "gram_out", "fisher"), seed=10):
    """Positive Fishers for every float tensor, full-rank input and output Grams for every 2-D one."""
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed + i)
        stats = {}
        for name, value in base.items():
            if not value.is_floating_point():
                continue
            if "fisher" in kinds:
                stats[f"{name}::fisher"] = torch.rand(value.shape, generator=g) + 0.1
            if value.dim() == 2 and "gram_in" in kinds:
                stats[f"{name}::gram_in"] = _gram(value.shape[1], g)
            if value.dim() == 2 and "gram_out" in kinds:
                stats[f"{name}::gram_out"] = _gram(value.shape[0], g)
        out.append(stats)
    return out


def write_statistics(root: Path, stats: list[dict[str, torch.Tensor]]) -> list[str]:
    """Each expert's statistics as a statistics file `root/expert<i>.statistics.safetensors`; their paths."""
    paths = []
    for i, tensors in enumerate(stats):
        path = root / f"expert{i}.statistics.safetensors"
        save_statistics(Statistics(tensors, {"format": "mergeflow-statistics"}), path)
        paths.append(str(path))
    return paths


def fit_experts(method: str, experts: list):
    """`experts` cut to as many as `method` merges (SLERP takes one): generic tests run every method on them."""
    from mergeflow.methods import method_class

    high = method_class(method).expert_count[1]
    return experts if high is None else experts[:high]
