"""Hugging Face seq2seq models (Flan-T5, T5, BART, ...) as classifiers by scoring label words, and GLUE metrics.

Rank classification: for each input and each candidate label word, the score is the log-likelihood the decoder
gives the word's token sequence (as the tokenizer encodes a target, for T5 including the closing `</s>`, which
keeps a word from winning as the prefix of a longer one), summed over its tokens, or averaged with
`length_normalize`. The prediction is the best-scoring word, so the model can never answer outside the label set
(FusionBench instead generates up to 10 tokens and counts exact string matches; a model that answers with a label
word gets the same prediction either way).

STS-B is a regression: following T5, targets are similarity scores written as numbers on a grid (`0.0`, `0.2`,
..., `5.0` by default); every grid string is scored as a label word and the prediction is the number of the best
one (`regression="argmax"`) or the probability-weighted mean of the grid under a softmax over the candidates'
scores (`"expected"`). Spearman's rho (primary) and Pearson's r are reported.

GLUE metrics (plain torch): accuracy for every classification task, Matthews correlation (primary) and accuracy for
CoLA, Spearman (primary) and Pearson for STS-B. The default input templates are T5's task prefixes
("cola sentence: ..."); models fine-tuned on other prompts (FusionBench's Flan-T5 experts) need those prompts and
label words, given as a `GlueTask`. FusionBench reports exact-match accuracy for CoLA, not Matthews correlation.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from mergeflow.progress import progress_bar

from mergeflow.errors import ConfigError, InputError
from mergeflow.families.base import device_of

Metric = Literal["accuracy", "matthews", "spearman"]
Regression = Literal["argmax", "expected"]


# ---------------------------------------------------------------------------------------------- scoring


def candidate_log_likelihoods(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                              candidates: Sequence[Sequence[int]], *, length_normalize: bool = False) -> Tensor:
    """[B, K] float32 log p(candidate k | input b) on the model's device, differentiable: the sum (or, with
    `length_normalize`, the mean) over the candidate's token ids of the decoder's log-probabilities, teacher-forced.
    The encoder runs once per batch, the decoder once per candidate; the model's mode (train/eval) is left alone."""
    if not candidates or any(len(c) == 0 for c in candidates):
        raise InputError("every candidate needs at least one token")
    device = device_of(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    encoded = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
    columns = []
    for candidate in candidates:
        labels = torch.tensor(list(candidate), device=device).repeat(input_ids.shape[0], 1)
        logits = model(encoder_outputs=encoded, attention_mask=attention_mask, labels=labels).logits
        token_log_probs = logits.float().log_softmax(dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        total = token_log_probs.sum(dim=-1)
        columns.append(total / len(candidate) if length_normalize else total)
    return torch.stack(columns, dim=-1)


@torch.no_grad()
def sequence_log_likelihoods(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                             candidates: Sequence[Sequence[int]], *, length_normalize: bool = False) -> Tensor:
    """`candidate_log_likelihoods` in eval mode without gradients, as a [B, K] float32 CPU tensor."""
    model.eval()
    return candidate_log_likelihoods(model, input_ids, attention_mask, candidates,
                                     length_normalize=length_normalize).cpu()


def _target_ids(tokenizer: Any, words: Sequence[str]) -> list[list[int]]:
    ids = tokenizer(text_target=list(words))["input_ids"]
    return [list(map(int, row)) for row in ids]


def score_label_words(model: nn.Module, tokenizer: Any, texts: Sequence[str], label_words: Sequence[str], *,
                      batch_size: int = 16, max_length: int = 512, length_normalize: bool = False,
                      progress: bool = False) -> Tensor:
    """[N, K] float32 CPU scores (`sequence_log_likelihoods`) of each label word for each text, in the texts' order
    (batched by length to pad less). `label_words` are tokenised as targets (`tokenizer(text_target=...)`)."""
    if not texts:
        raise InputError("no texts to score")
    candidates = _target_ids(tokenizer, label_words)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    scores = torch.empty(len(texts), len(candidates))
    for start in progress_bar(range(0, len(order), batch_size), desc="score", disable=not progress):
        chunk = order[start:start + batch_size]
        inputs = tokenizer([texts[i] for i in chunk], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt")
        scores[chunk] = sequence_log_likelihoods(model, inputs["input_ids"], inputs["attention_mask"], candidates,
                                                 length_normalize=length_normalize)
    return scores


def classify(model: nn.Module, tokenizer: Any, texts: Sequence[str], label_words: Sequence[str],
             **kwargs: Any) -> Tensor:
    """[N] int64 index of the best-scoring label word per text (`score_label_words` keywords pass through)."""
    return score_label_words(model, tokenizer, texts, label_words, **kwargs).argmax(dim=-1)


# ---------------------------------------------------------------------------------------------- metrics


def _pair(predictions: Tensor | Sequence[float], labels: Tensor | Sequence[float],
          dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    x = torch.as_tensor(predictions, dtype=dtype).reshape(-1)
    y = torch.as_tensor(labels, dtype=dtype).reshape(-1)
    if x.shape != y.shape:
        raise InputError(f"{x.numel()} predictions for {y.numel()} labels")
    if x.numel() == 0:
        raise InputError("a metric of an empty set")
    return x, y


def accuracy(predictions: Tensor | Sequence[int], labels: Tensor | Sequence[int]) -> float:
    """Share of predictions equal to their label."""
    x, y = _pair(predictions, labels, torch.int64)
    return float((x == y).double().mean())


def matthews_corrcoef(predictions: Tensor | Sequence[int], labels: Tensor | Sequence[int]) -> float:
    """Matthews correlation coefficient, multiclass form (Gorodkin's R_K; the usual formula for two classes):
    (c*s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2) (s^2 - sum_k t_k^2)), with s samples, c correct, p_k / t_k
    the counts predicted as / truly in class k. 0.0 when either side is constant (as scikit-learn)."""
    x, y = _pair(predictions, labels, torch.int64)
    classes = int(max(x.max(), y.max())) + 1
    if int(min(x.min(), y.min())) < 0:
        raise InputError("class ids must be non-negative")
    p = torch.bincount(x, minlength=classes).double()
    t = torch.bincount(y, minlength=classes).double()
    s, c = float(x.numel()), float((x == y).sum())
    denominator = (s * s - float((p * p).sum())) * (s * s - float((t * t).sum()))
    if denominator == 0:
        return 0.0
    return (c * s - float((p * t).sum())) / denominator ** 0.5


def average_ranks(values: Tensor | Sequence[float]) -> Tensor:
    """1-based ranks (float64), ties sharing the mean of the ranks they span."""
    x = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    sorted_x = x[order]
    start = 0
    while start < len(x):
        stop = start + 1
        while stop < len(x) and sorted_x[stop] == sorted_x[start]:
            stop += 1
        ranks[order[start:stop]] = (start + 1 + stop) / 2.0  # mean of start+1 .. stop
        start = stop
    return ranks


def pearson(x: Tensor | Sequence[float], y: Tensor | Sequence[float]) -> float:
    """Pearson's r; nan when either side is constant."""
    a, b = _pair(x, y, torch.float64)
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return float("nan") if denominator == 0 else float((a * b).sum()) / denominator


def spearman(x: Tensor | Sequence[float], y: Tensor | Sequence[float]) -> float:
    """Spearman's rho: Pearson's r of the average ranks (ties handled as scipy.stats.spearmanr does)."""
    a, b = _pair(x, y, torch.float64)
    return pearson(average_ranks(a), average_ranks(b))


# ---------------------------------------------------------------------------------------------- GLUE


@dataclass(frozen=True)
class GlueTask:
    """How a GLUE task is put to a seq2seq model: `template` (str.format fields named as the dataset's columns),
    the target text of each class id (`label_words`), or for a regression the number each word stands for
    (`values`), and the primary metric."""

    name: str
    template: str
    label_words: tuple[str, ...]
    metric: Metric
    values: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not self.label_words:
            raise ConfigError(f"task {self.name!r}: no label words")
        if (self.metric == "spearman") != (self.values is not None):
            raise ConfigError(f"task {self.name!r}: a regression (metric 'spearman') needs values, and only it")
        if self.values is not None and len(self.values) != len(self.label_words):
            raise ConfigError(f"task {self.name!r}: {len(self.values)} values for {len(self.label_words)} words")

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(name for _, name, _, _ in string.Formatter().parse(self.template) if name)

    def format(self, example: Mapping[str, Any]) -> str:
        """The model input for one example (a row with the template's fields)."""
        missing = [field for field in self.fields if field not in example]
        if missing:
            raise InputError(f"task {self.name!r}: example has no field {missing[0]!r} (fields: {sorted(example)})")
        return self.template.format(**{field: example[field] for field in self.fields})


def stsb_grid(step: float = 0.2) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """STS-B's label words and values: the numbers 0..5 in steps of `step`, written with one decimal."""
    count = round(5.0 / step)
    if step <= 0 or abs(count * step - 5.0) > 1e-9:
        raise ConfigError(f"stsb step must divide 5, got {step}")
    values = tuple(round(i * step, 6) for i in range(count + 1))
    return tuple(f"{v:.1f}" for v in values), values


_STSB_WORDS, _STSB_VALUES = stsb_grid(0.2)

GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("cola", "cola sentence: {sentence}", ("unacceptable", "acceptable"), "matthews"),
    "mnli": GlueTask("mnli", "mnli hypothesis: {hypothesis} premise: {premise}",
                     ("entailment", "neutral", "contradiction"), "accuracy"),
    "mrpc": GlueTask("mrpc", "mrpc sentence1: {sentence1} sentence2: {sentence2}",
                     ("not_equivalent", "equivalent"), "accuracy"),
    "qnli": GlueTask("qnli", "qnli question: {question} sentence: {sentence}",
                     ("entailment", "not_entailment"), "accuracy"),
    "qqp": GlueTask("qqp", "qqp question1: {question1} question2: {question2}",
                    ("not_duplicate", "duplicate"), "accuracy"),
    "rte": GlueTask("rte", "rte sentence1: {sentence1} sentence2: {sentence2}",
                    ("entailment", "not_entailment"), "accuracy"),
    "sst2": GlueTask("sst2", "sst2 sentence: {sentence}", ("negative", "positive"), "accuracy"),
    "stsb": GlueTask("stsb", "stsb sentence1: {sentence1} sentence2: {sentence2}", _STSB_WORDS, "spearman",
                     _STSB_VALUES),
}


def predictions_from_scores(task: GlueTask, scores: Tensor, *, regression: Regression = "argmax") -> Tensor:
    """Class ids [N] (int64) of a classification task, or predicted numbers [N] (float64) of a regression."""
    if scores.shape[-1] != len(task.label_words):
        raise InputError(f"task {task.name!r}: scores for {scores.shape[-1]} words, the task has "
                         f"{len(task.label_words)}")
    best = scores.argmax(dim=-1)
    if task.values is None:
        return best
    values = torch.tensor(task.values, dtype=torch.float64)
    if regression == "argmax":
        return values[best]
    if regression == "expected":
        return scores.double().softmax(dim=-1) @ values
    raise ConfigError(f"regression must be 'argmax' or 'expected', got {regression!r}")


def glue_metrics(task: GlueTask, predictions: Tensor | Sequence[float],
                 labels: Tensor | Sequence[float]) -> dict[str, float]:
    """The task's metrics; `score` repeats the primary one (Matthews for CoLA, Spearman for STS-B, else accuracy)."""
    if task.values is not None:
        result = {"spearman": spearman(predictions, labels), "pearson": pearson(predictions, labels)}
    else:
        result = {"accuracy": accuracy(predictions, labels)}
        if task.metric == "matthews":
            result["matthews"] = matthews_corrcoef(predictions, labels)
    return {**result, "score": result[task.metric]}
