"""Fine-tune a text encoder under a frozen classification head: one expert per task, seeded and deterministic.

AdamW with linear warmup and cosine decay, fp32, batches sampled with a seeded generator; the head never changes,
so what the expert learns lives entirely in the encoder's weights (its task vector).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from mergeflow.adapters.hf_text import TextEncoder, encoder_state_dict
from mergeflow.data.text_tasks import TextSplit
from mergeflow.heads import ClassificationHead


@dataclass(frozen=True)
class FinetuneSettings:
    """Defaults fit the CPU demo: 100 steps of 16 x 64 tokens take 50-75 s on 2 cores (MiniLM)."""

    steps: int = 100
    batch_size: int = 16
    lr: float = 5e-5
    weight_decay: float = 0.1
    warmup_steps: int = 10
    max_length: int = 64
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.max_length < 2 or self.warmup_steps < 0:
            raise ValueError(f"invalid fine-tuning settings: {self}")


@dataclass
class FinetuneResult:
    state_dict: dict[str, Tensor]  # as from encoder_state_dict: same keys, shapes and dtypes as the base checkpoint
    losses: list[float]  # training loss per step
    seconds: float


def _lr_factor(step: int, settings: FinetuneSettings) -> float:
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _batches(size: int, settings: FinetuneSettings) -> list[Tensor]:
    """`settings.steps` index batches: seeded permutations of the split, one after another."""
    generator = torch.Generator().manual_seed(settings.seed)
    needed = settings.steps * settings.batch_size
    order = torch.cat([torch.randperm(size, generator=generator) for _ in range(math.ceil(needed / size))])
    return list(order[:needed].split(settings.batch_size))


def finetune_encoder(
    encoder: TextEncoder,
    tokenizer: PreTrainedTokenizerBase,
    head: ClassificationHead,
    split: TextSplit,
    settings: FinetuneSettings,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> FinetuneResult:
    """Train `encoder` in place on `split` with cross-entropy through the frozen `head`; return its weights."""
    if not split.texts:
        raise ValueError("cannot fine-tune on an empty split")
    start = time.perf_counter()
    encoder.to(device).train()
    labels = torch.tensor(split.labels, dtype=torch.long)
    parameters = [p for p in encoder.parameters() if p.requires_grad]
    # The usual BERT recipe: no weight decay on biases and LayerNorm weights (the 1-D tensors).
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in parameters if p.ndim >= 2], "weight_decay": settings.weight_decay},
            {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=settings.lr,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, settings))
    losses: list[float] = []
    with torch.random.fork_rng(devices=[]):  # dropout draws from the global generator: seed it, leave caller's alone
        torch.manual_seed(settings.seed)
        bar = tqdm(_batches(len(split.texts), settings), desc="fine-tune", disable=not progress)
        for batch in bar:
            inputs = tokenizer(
                [split.texts[i] for i in batch],
                padding=True,
                truncation=True,
                max_length=settings.max_length,
                return_tensors="pt",
            ).to(device)
            features = encoder(inputs["input_ids"], inputs["attention_mask"])
            loss = F.cross_entropy(head.logits(features), labels[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, settings.grad_clip)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    encoder.eval()
    return FinetuneResult(encoder_state_dict(encoder), losses, time.perf_counter() - start)
