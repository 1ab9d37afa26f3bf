"""Scores of any model family: accuracy under a frozen task head, normalised accuracy and the results table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mergeflow.heads import ClassificationHead


def correct(head: ClassificationHead, features: Tensor, labels: Tensor | Sequence[int]) -> Tensor:
    """Per row, whether its highest logit is the label (bool)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if len(labels) == 0:
        raise ValueError("accuracy of an empty set")
    return head.logits(features).argmax(dim=-1).cpu() == labels


def accuracy(head: ClassificationHead, features: Tensor, labels: Tensor | Sequence[int]) -> float:
    """Share of rows whose highest logit is the label, in [0, 1]."""
    return float(correct(head, features, labels).float().mean())


def scored(hits: Tensor) -> tuple[float, list[int]]:
    """(accuracy, each example's credit 1/0) of a bool vector, the accuracy exactly as `accuracy` computes it."""
    return float(hits.float().mean()), hits.int().tolist()


def normalized_accuracy(model_acc: Mapping[str, float], expert_acc: Mapping[str, float]) -> dict[str, float]:
    """Per task, the model's accuracy over that task's own expert's accuracy (NaN, undefined, where the expert
    scores 0)."""
    return {task: acc / expert_acc[task] if expert_acc[task] else float("nan") for task, acc in model_acc.items()}


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
