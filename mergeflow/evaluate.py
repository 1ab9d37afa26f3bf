"""Score encoders with frozen task heads: features, accuracy, normalised accuracy and the results table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from mergeflow.progress import progress_bar
from transformers import PreTrainedTokenizerBase

from mergeflow.adapters.hf_text import TextEncoder
from mergeflow.data.text_tasks import TextSplit
from mergeflow.heads import ClassificationHead


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


def accuracy(head: ClassificationHead, features: Tensor, labels: Tensor | Sequence[int]) -> float:
    """Share of rows whose highest logit is the label, in [0, 1]."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if len(labels) == 0:
        raise ValueError("accuracy of an empty set")
    predictions = head.logits(features).argmax(dim=-1).cpu()
    return float((predictions == labels).float().mean())


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
    results = {}
    for name, (head, split) in tasks.items():
        features = encode_texts(
            encoder,
            tokenizer,
            split.texts,
            batch_size=batch_size,
            max_length=max_length,
            device=device,
            progress=progress,
        )
        results[name] = accuracy(head, features, split.labels)
    return results


def normalized_accuracy(model_acc: Mapping[str, float], expert_acc: Mapping[str, float]) -> dict[str, float]:
    """Per task, the model's accuracy over that task's own expert's accuracy."""
    return {task: acc / expert_acc[task] for task, acc in model_acc.items()}


def format_results_table(
    rows: Mapping[str, Mapping[str, float]], tasks: Sequence[str], expert_acc: Mapping[str, float]
) -> str:
    """A markdown table in %: one row per model (in the given order), columns = tasks, avg, norm. avg."""
    header = ["model", *tasks, "avg", "norm. avg"]
    body = []
    for model, acc in rows.items():
        per_task = [acc[task] for task in tasks]
        normalized = normalized_accuracy({task: acc[task] for task in tasks}, expert_acc)
        values = [*per_task, sum(per_task) / len(tasks), sum(normalized.values()) / len(tasks)]
        body.append([model, *(f"{100 * value:.1f}" for value in values)])
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = [cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(cells)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (widths[0] + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(cells) for cells in body)])
