"""Score and probe an `ImageEncoder`: features of images, accuracy per task under frozen heads, statistics for
the data-aware methods, and AdaMerging's entropy objective.

Statistics hooks see the `nn.Linear` layers that run as modules. Hugging Face CLIP's q/k/v/out projections and
MLPs all do. open_clip's attention is `nn.MultiheadAttention`: its packed in-projection is a bare parameter and its
`out_proj` weight is applied without calling the module, so only the MLP layers (`mlp.c_fc`, `mlp.c_proj`) get
Grams there; data-aware methods treat the attention weights as layers without statistics.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor
from torch.func import functional_call

from mergeflow.errors import InputError
from mergeflow.evaluate import correct, scored
from mergeflow.families.base import device_of
from mergeflow.families.clip.data import ImageSplit
from mergeflow.families.clip.vision import ImageEncoder, ImageInput
from mergeflow.heads import ClassificationHead
from mergeflow.progress import progress_bar
from mergeflow.selection import ParameterSelection
from mergeflow.statistics import KINDS, FisherLabels, Statistics, collect_statistics
from mergeflow.task_vectors import Objective


@torch.no_grad()
def encode_images(encoder: ImageEncoder, images: Sequence[ImageInput], *, batch_size: int = 64,
                  device: str | torch.device = "cpu", progress: bool = False) -> Tensor:
    """[N, D] float32 CPU features of `images`, in their order (preprocessed per batch, eval mode)."""
    was_training = encoder.training
    encoder.to(device).eval()
    chunks = []
    for start in progress_bar(range(0, len(images), batch_size), desc="encode", disable=not progress):
        pixels = encoder.preprocess([images[i] for i in range(start, min(start + batch_size, len(images)))])
        chunks.append(encoder(pixels.to(device)).float().cpu())
    encoder.train(was_training)
    if not chunks:
        raise InputError("no images to encode")
    return torch.cat(chunks)


def evaluate_image_encoder(encoder: ImageEncoder, tasks: Mapping[str, tuple[ClassificationHead, ImageSplit]], *,
                           batch_size: int = 64, device: str | torch.device = "cpu",
                           progress: bool = False) -> dict[str, float]:
    """Accuracy of `encoder` on each task's split, scored with that task's head."""
    return {name: value for name, (value, _) in score_image_encoder(encoder, tasks, batch_size=batch_size,
                                                                    device=device, progress=progress).items()}


def score_image_encoder(encoder: ImageEncoder, tasks: Mapping[str, tuple[ClassificationHead, ImageSplit]], *,
                        batch_size: int = 64, device: str | torch.device = "cpu",
                        progress: bool = False) -> dict[str, tuple[float, list[int]]]:
    """Per task (accuracy, each example's credit 1/0) of `encoder` under that task's head."""
    return {name: scored(correct(head, encode_images(encoder, split.images, batch_size=batch_size, device=device,
                                                     progress=progress), split.labels))
            for name, (head, split) in tasks.items()}


def image_classification_statistics(
    encoder: ImageEncoder,
    head: ClassificationHead,
    split: ImageSplit,
    *,
    kinds: Sequence[str] = KINDS,
    fisher: FisherLabels = "empirical",
    max_examples: int = 1000,
    batch_size: int = 16,
    seed: int = 0,
    selection: ParameterSelection | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Statistics:
    """Statistics (`mergeflow.statistics`) of `encoder` under its task's frozen `head` on the first `max_examples`
    images of `split`, named as in the backbone's checkpoint."""
    encoder.to(device)
    count = min(len(split.images), max_examples)

    def batches() -> Iterator[dict[str, Tensor]]:
        for start in range(0, count, batch_size):
            stop = min(start + batch_size, count)
            yield {"pixel_values": encoder.preprocess([split.images[i] for i in range(start, stop)]).to(device),
                   "labels": torch.tensor(split.labels[start:stop], device=device)}

    def logits(batch: Mapping[str, Tensor]) -> Tensor:
        return head.logits(encoder(batch["pixel_values"]))

    return collect_statistics(encoder.backbone, batches(), logits, kinds=kinds, fisher=fisher,
                              max_examples=max_examples, seed=seed, selection=selection, progress=progress)


def entropy_objective(encoder: ImageEncoder, tasks: Mapping[str, tuple[ClassificationHead, ImageSplit]], *,
                      batch_size: int = 16, seed: int = 0) -> Objective:
    """AdaMerging's objective: `(merged, step)` runs `encoder` with the `merged` tensors (checkpoint names; those
    absent keep the encoder's own) on step `step`'s batch of every task's images, and returns the sum over tasks of
    the mean Shannon entropy of its frozen head's softmax. Each task cycles through its images in a seeded order;
    labels are never read. The encoder is frozen (eval, no gradients) and used on its own device."""
    if not tasks:
        raise InputError("entropy_objective needs at least one task")
    encoder.eval().requires_grad_(False)
    device = device_of(encoder)
    generator = torch.Generator().manual_seed(seed)
    streams = []
    for name, (head, split) in tasks.items():
        if len(split.images) == 0:
            raise InputError(f"task {name!r} has no images")
        streams.append((head, split.images, torch.randperm(len(split.images), generator=generator).tolist()))

    def objective(merged: Mapping[str, Tensor], step: int) -> Tensor:
        weights = {f"backbone.{key}": value for key, value in merged.items()}
        total = torch.zeros((), device=device)
        for head, images, order in streams:
            size = min(batch_size, len(order))
            pixels = encoder.preprocess([images[order[(step * size + j) % len(order)]] for j in range(size)])
            features = functional_call(encoder, weights, (pixels.to(device),))
            log_probs = head.logits(features).log_softmax(dim=-1)
            total = total - (log_probs.exp() * log_probs).sum(dim=-1).mean()
        return total

    return objective
