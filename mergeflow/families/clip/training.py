"""Fine-tune a CLIP vision tower under a frozen (zero-shot) head with the generic trainer (`mergeflow.finetune`)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mergeflow.families.clip.vision import image_encoder_state_dict
from mergeflow.finetune import FinetuneResult, FinetuneSettings, TrainingData, train_classifier
from mergeflow.heads import ClassificationHead


def finetune_image_encoder(
    encoder: nn.Module,
    head: ClassificationHead,
    split: Any,
    settings: FinetuneSettings,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    checkpoint_dir: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> FinetuneResult:
    """Train an image encoder (`mergeflow.families.clip.vision.ImageEncoder`, its own CLIP preprocessing) in place
    on an `ImageSplit` under the frozen (e.g. zero-shot) `head`, with the same recipe, checkpoints and resume."""
    if not len(split.images):
        raise ValueError("cannot fine-tune on an empty split")
    device = torch.device(device)

    def features(batch: Tensor) -> Tensor:
        return encoder(encoder.preprocess([split.images[int(i)] for i in batch]).to(device))

    digest = hashlib.sha256()
    for image, label in zip(split.images, split.labels, strict=True):
        digest.update(f"{label}\t{image.size}\t".encode())
        digest.update(image.tobytes())
    data = TrainingData(len(split.images), torch.tensor(split.labels, dtype=torch.long), features, digest.hexdigest())
    return train_classifier(encoder, head, data, settings, lambda: image_encoder_state_dict(encoder), device=device,
                            progress=progress, checkpoint_dir=checkpoint_dir, storage_options=storage_options)
