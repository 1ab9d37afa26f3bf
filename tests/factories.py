"""Tiny random models for tests: real tensors, written as real checkpoint files by the fixtures."""

from __future__ import annotations

import torch


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
