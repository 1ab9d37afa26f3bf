"""Fine-tune a text encoder under a frozen linear head with the generic trainer (`mergeflow.finetune`)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from mergeflow.families.text.data import TextSplit
from mergeflow.families.text.encoder import TextEncoder, encoder_state_dict
from mergeflow.finetune import FinetuneResult, FinetuneSettings, TrainingData, train_classifier
from mergeflow.heads import ClassificationHead


def _split_digest(split: TextSplit) -> str:
    """sha256 of the texts and labels, so a checkpoint is never resumed on other data."""
    digest = hashlib.sha256()
    for text, label in zip(split.texts, split.labels, strict=True):
        digest.update(f"{label}\t{len(text)}\t".encode())
        digest.update(text.encode())
    return digest.hexdigest()


def finetune_encoder(
    encoder: TextEncoder,
    tokenizer: PreTrainedTokenizerBase,
    head: ClassificationHead,
    split: TextSplit,
    settings: FinetuneSettings,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    checkpoint_dir: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> FinetuneResult:
    """Train a text `encoder` in place on `split` with cross-entropy through the frozen `head`; return its weights.

    With `checkpoint_dir`, a checkpoint found there is resumed (after checking that its settings and data match,
    else a ValueError naming what differs), and a new one replaces it every `settings.checkpoint_every` steps.
    """
    if not split.texts:
        raise ValueError("cannot fine-tune on an empty split")
    device = torch.device(device)

    def features(batch: Tensor) -> Tensor:
        inputs = tokenizer([split.texts[i] for i in batch], padding=True, truncation=True,
                           max_length=settings.max_length, return_tensors="pt").to(device)
        return encoder(inputs["input_ids"], inputs["attention_mask"])

    data = TrainingData(len(split.texts), torch.tensor(split.labels, dtype=torch.long), features, _split_digest(split))
    return train_classifier(encoder, head, data, settings, lambda: encoder_state_dict(encoder), device=device,
                            progress=progress, checkpoint_dir=checkpoint_dir, storage_options=storage_options)
