"""Frozen classification heads on unit-norm features, fit as linear probes and stored as safetensors.

As in the CLIP merging protocol, each task's head is fit once on pretrained features and then frozen: only the
shared encoder is fine-tuned and merged, so every encoder is scored with the same heads. Logits are
`logit_scale * (features @ weight.T + bias)` with weight rows of mean norm 1, so `logit_scale` plays the role of
CLIP's temperature.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from mergeflow.checkpoints.safetensors_format import save_safetensors
from torch import Tensor


@dataclass
class ClassificationHead:
    weight: Tensor  # [C, H]
    bias: Tensor  # [C]
    logit_scale: float

    def logits(self, features: Tensor) -> Tensor:
        """[B, H] features -> [B, C] logits (computed on the features' device and dtype)."""
        weight, bias = self.weight.to(features), self.bias.to(features)
        return self.logit_scale * (features @ weight.T + bias)

    def save(self, path: Path) -> None:
        tensors = {"weight": self.weight.detach().cpu().contiguous(), "bias": self.bias.detach().cpu().contiguous()}
        save_safetensors(tensors, path, {"logit_scale": repr(float(self.logit_scale))})

    @classmethod
    def load(cls, path: Path) -> ClassificationHead:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            if "logit_scale" not in metadata:
                raise ValueError(f"{path} is not a classification head: no logit_scale in its metadata")
            return cls(file.get_tensor("weight"), file.get_tensor("bias"), float(metadata["logit_scale"]))


def fit_linear_probe(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    weight_decay: float = 1e-3,
    steps: int = 200,
    seed: int = 0,
) -> ClassificationHead:
    """Multinomial logistic regression (full batch, L-BFGS, L2 penalty `weight_decay / 2 * |W|^2`) on `features`.

    The penalty sets the head's scale and with it how much gradient the frozen head passes to the encoder: a
    probe that is too confident (tiny penalty) leaves well-classified texts with no loss, a too weak one
    (large penalty) cannot express a confident prediction at all. The default 1e-3 gives logit scales of 5-7 on
    MiniLM's unit features. The fitted function is returned unchanged, rescaled into
    `logit_scale * (x @ weight.T + bias)` with weight rows of mean norm 1. `seed` only draws the small random
    start (the problem is convex).
    """
    features = features.detach().to(torch.float32).cpu()
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    generator = torch.Generator().manual_seed(seed)
    weight = (0.01 * torch.randn(num_classes, features.shape[1], generator=generator)).requires_grad_()
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=steps,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight.T + bias, labels) + weight_decay / 2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    scale = float(weight.detach().norm(dim=1).mean())
    return ClassificationHead(weight.detach() / scale, bias.detach() / scale, scale)
