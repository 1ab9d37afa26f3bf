"""Score a text encoder: features of texts, and accuracy per task under each task's frozen head."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from mergeflow.evaluate import correct, scored
from mergeflow.families.text.data import TextSplit
from mergeflow.families.text.encoder import TextEncoder
from mergeflow.heads import ClassificationHead
from mergeflow.progress import progress_bar


@torch.no_grad()
def encode_texts(
    encoder: TextEncoder,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    max_length: int,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Tensor:
    """[N, H] float32 CPU features of `texts`, in their order (encoded in eval mode, sorted by length to pad less)."""
    was_training = encoder.training
    encoder.to(device).eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    features = torch.empty(len(texts), encoder.backbone.config.hidden_size)
    for chunk in progress_bar(chunks, desc="encode", disable=not progress):
        inputs = tokenizer(
            [texts[i] for i in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        ).to(device)
        features[chunk] = encoder(inputs["input_ids"], inputs["attention_mask"]).float().cpu()
    encoder.train(was_training)
    return features


def evaluate_encoder(
    encoder: TextEncoder,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Mapping[str, tuple[ClassificationHead, TextSplit]],
    *,
    max_length: int,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, float]:
    """Accuracy of `encoder` on each task's split, scored with that task's head."""
    return {name: value for name, (value, _) in score_encoder(encoder, tokenizer, tasks, max_length=max_length,
                                                                batch_size=batch_size, device=device,
                                                                progress=progress).items()}


def score_encoder(encoder: TextEncoder, tokenizer: PreTrainedTokenizerBase,
                  tasks: Mapping[str, tuple[ClassificationHead, TextSplit]], *, max_length: int, batch_size: int = 64,
                  device: str | torch.device = "cpu", progress: bool = False) -> dict[str, tuple[float, list[int]]]:
    """Per task (accuracy, each example's credit 1/0) of `encoder` under that task's head."""
    results = {}
    for name, (head, split) in tasks.items():
        features = encode_texts(encoder, tokenizer, split.texts, batch_size=batch_size, max_length=max_length,
                                device=device, progress=progress)
        results[name] = scored(correct(head, features, split.labels))
    return results
