"""Full fine-tuning, statistics and AdaMerging's objective for causal LMs, on the same targets as the scoring.

Every example becomes one (context, target) request (`training_requests`): a multiple-choice question and its
correct choice (after the task's delimiter), a short-answer question and its answer followed by the stop string
(so the model learns where an answer ends), or a text after the prefix token (its first `max_length` tokens).
Fine-tuning minimises the mean next-token cross-entropy over the target tokens only (the question is context, as
in supervised fine-tuning), through the generic trainer (`mergeflow.finetune.train_classifier`: its schedule,
checkpoints and resume) with the token logits as [B, V, T] "logits" and the target ids as [B, T] labels (-100
where nothing is predicted). A bf16 model is trained in fp32 and handed back in its own dtypes.

Statistics use the same loss: the Fisher is that of each example's target log-likelihood (empirical labels only;
sampling a target would be generation), and the Grams leave padding out. Every linear layer has Grams except the
LM head (vocabulary-squared): `nn.Linear`, and GPT-2's attention and MLP (`c_attn`, `c_proj`, `c_fc`), which are
`transformers.pytorch_utils.Conv1D` (weight stored [in_features, out_features], y = x @ W + b). Their Gram is the
same x^T x of the layer's input; the statistics list these weights as stored [in, out] (`statistics.IN_OUT`), so
RegMean and MaTS multiply them by the Gram from the left (W* = (sum G_i)^-1 sum G_i W_i) where an nn.Linear
weight is transposed first.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergeflow.errors import CheckpointError, ConfigError, InputError
from mergeflow.families.base import device_of, listed_keys
from mergeflow.families.causal_lm.data import AnswerSplit, CausalSplit, ChoiceSplit, TextSplit, split_rows
from mergeflow.families.causal_lm.model_dir import canonical_names, causal_lm_state_dict
from mergeflow.families.causal_lm.scoring import (
    Request,
    TaskPrompt,
    as_logits,
    choice_requests,
    encode,
    encode_pair,
    forward_logits,
    pad_id_of,
    padded_batch,
    prefix_token,
    request_log_likelihoods,
)
from mergeflow.finetune import FinetuneResult, FinetuneSettings, TrainingData, train_classifier
from mergeflow.selection import ParamKind, ParameterSelection
from mergeflow.statistics import KINDS, FisherLabels, Statistics, collect_statistics, split_statistic_key
from mergeflow.task_vectors import Objective

IGNORE = -100  # F.cross_entropy's ignore_index


def training_requests(tokenizer: Any, prompt: TaskPrompt, split: CausalSplit, max_length: int) -> list[Request]:
    """One (context, target) request per example (see the module docstring)."""
    if prompt.kind != split.kind:
        raise ConfigError(f"the task's prompt is for a {prompt.kind} task, its data is {split.kind}")
    if isinstance(split, ChoiceSplit):
        return [encode_pair(tokenizer, q, prompt.target_delimiter + c[a])
                for q, c, a in zip(split.questions, split.choices, split.answers, strict=True)]
    if isinstance(split, TextSplit):
        return [([prefix_token(tokenizer)], encode(tokenizer, text)[:max_length]) for text in split.texts]
    return [encode_pair(tokenizer, q, prompt.target_delimiter + a + prompt.stop)
            for q, a in zip(split.questions, split.answers, strict=True)]


def target_labels(requests: Sequence[Request], max_length: int, width: int | None = None) -> Tensor:
    """[N, width] int64: the target id where a continuation token is predicted, IGNORE elsewhere (positions as in
    `padded_batch`; width defaults to `max_length`)."""
    from mergeflow.families.causal_lm.scoring import _window

    labels = torch.full((len(requests), width or max_length), IGNORE, dtype=torch.long)
    for row, request in enumerate(requests):
        inputs, targets, count = _window(request, max_length)
        labels[row, len(inputs) - count:len(inputs)] = torch.tensor(targets[len(inputs) - count:])
    return labels


def token_logits(model: nn.Module, requests: Sequence[Request], max_length: int, pad_id: int,
                 width: int | None = None) -> tuple[Tensor, Tensor]:
    """([B, V, width] float logits, [B, T] attention mask) of a right-padded batch; `width` pads the token axis
    with zero logits (never a target) to a fixed length."""
    ids, mask, _ = padded_batch(requests, max_length, pad_id, device_of(model))
    logits = forward_logits(model, ids, mask).float()
    if width is not None and width > logits.shape[1]:
        logits = F.pad(logits, (0, 0, 0, width - logits.shape[1]))
    return logits.transpose(1, 2), mask


def _digest(prompt: TaskPrompt, split: CausalSplit) -> str:
    """sha256 of the prompt and every example, so no checkpoint resumes on other data."""
    digest = hashlib.sha256(json.dumps([prompt.__dict__, split.kind], sort_keys=True).encode())
    for row in split_rows(split):
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


class _TokenLogits:
    """The trainer's "head": the token logits already are the logits."""

    def logits(self, features: Tensor) -> Tensor:
        return features


def finetune_causal_lm(model: nn.Module, tokenizer: Any, prompt: TaskPrompt, split: CausalSplit,
                       settings: FinetuneSettings, *, device: str | torch.device = "cpu", progress: bool = True,
                       checkpoint_dir: str | None = None,
                       storage_options: Mapping[str, Any] | None = None) -> FinetuneResult:
    """Fine-tune every parameter of `model` in place on the split's targets (`settings.max_length` tokens per
    example); returns `causal_lm_state_dict` in the dtypes the model came in."""
    requests = training_requests(tokenizer, prompt, split, settings.max_length)
    if not requests:
        raise InputError("cannot fine-tune on an empty split")
    dtypes = {name: tensor.dtype for name, tensor in causal_lm_state_dict(model).items()}
    device = torch.device(device)
    model.to(device=device, dtype=torch.float32)  # AdamW on bf16 weights loses most small updates
    model.requires_grad_(True)
    labels, pad = target_labels(requests, settings.max_length), pad_id_of(tokenizer)

    def features(batch: Tensor) -> Tensor:
        return token_logits(model, [requests[int(i)] for i in batch], settings.max_length, pad,
                            width=settings.max_length)[0]

    data = TrainingData(len(requests), labels, features, _digest(prompt, split))
    return train_classifier(model, _TokenLogits(), data, settings,  # type: ignore[arg-type]
                            lambda: causal_lm_state_dict(model, dtypes), device=device, progress=progress,
                            checkpoint_dir=checkpoint_dir, storage_options=storage_options)


# ---------------------------------------------------------------------------------------------- statistics


def _selection(model: nn.Module, selection: ParameterSelection | None) -> ParameterSelection:
    """`selection` (default: every linear layer) without the LM head and the layers whose weight is a tied alias."""
    aliases = [name for name, first in canonical_names(model).items() if name != first]
    exclude = (r"^lm_head\.", *(f"^{re.escape(name)}$" for name in aliases))
    if selection is None:
        return ParameterSelection(kinds=frozenset(ParamKind), exclude=exclude)
    return ParameterSelection(kinds=selection.kinds, include=tuple(selection.include),
                              exclude=(*selection.exclude, *exclude))


def causal_lm_statistics(model: nn.Module, tokenizer: Any, prompt: TaskPrompt, split: CausalSplit, *,
                         kinds: Sequence[str] = KINDS, fisher: FisherLabels = "empirical", max_examples: int = 1000,
                         batch_size: int = 16, max_length: int = 64, seed: int = 0, progress: bool = False,
                         selection: ParameterSelection | None = None) -> Statistics:
    """Statistics (`mergeflow.statistics`) of `model` on the first `max_examples` examples' targets (see the module
    docstring); keys are checkpoint names."""
    if fisher != "empirical" and "fisher" in kinds:
        raise ConfigError("statistics.fisher: causal_lm supports 'empirical' only (a sampled label would be a "
                          "generated continuation)")
    requests = training_requests(tokenizer, prompt, split, max_length)[:max_examples]
    if not requests:
        raise InputError("no examples to compute statistics on")
    pad = pad_id_of(tokenizer)
    order = sorted(range(len(requests)), key=lambda i: len(requests[i][0]) + len(requests[i][1]))

    def batches() -> Iterator[dict[str, Tensor]]:
        for start in range(0, len(order), batch_size):
            chunk = [requests[i] for i in order[start:start + batch_size]]
            ids, mask, _ = padded_batch(chunk, max_length, pad, device_of(model))
            yield {"input_ids": ids, "attention_mask": mask,
                   "labels": target_labels(chunk, max_length, ids.shape[1]).to(ids.device)}

    def logits(batch: Mapping[str, Tensor]) -> Tensor:
        return forward_logits(model, batch["input_ids"], batch["attention_mask"]).float().transpose(1, 2)

    from transformers.pytorch_utils import Conv1D

    stats = collect_statistics(model, batches(), logits, kinds=kinds, fisher=fisher, max_examples=max_examples,
                               seed=seed, selection=_selection(model, selection), in_out=(Conv1D,),
                               progress=progress)
    kept = set(canonical_names(model).values())
    stray = sorted(key for key in stats.tensors if split_statistic_key(key)[0] not in kept)
    if stray:
        raise CheckpointError("<statistics>", f"statistics of tensors outside the checkpoint: {listed_keys(stray)}",
                              tensor=stray[0])
    return stats


# ---------------------------------------------------------------------------------------------- AdaMerging


def _entropy(log_probs: Tensor) -> Tensor:
    """Shannon entropy over the last axis; an absent choice (log-probability -inf) adds 0, not NaN."""
    return -(log_probs.exp() * log_probs.clamp_min(torch.finfo(log_probs.dtype).min)).sum(dim=-1)


def causal_lm_entropy_objective(model: nn.Module, tokenizer: Any,
                                tasks: Mapping[str, tuple[TaskPrompt, CausalSplit]], *, batch_size: int = 16,
                                max_length: int = 64, seed: int = 0) -> Objective:
    """AdaMerging's objective: `(merged, step)` runs `model` with the `merged` tensors (checkpoint names; absent
    ones keep the model's own; tied names follow their first) on step `step`'s batch of every task and returns the
    sum over tasks of a mean entropy: of the softmax over the choices' log-likelihoods (multiple choice), of the
    next-token distribution at every text token (perplexity), or at the first answer token (short answer).
    Answers are never read; each task cycles through its examples in a seeded order. The model is frozen."""
    if not tasks:
        raise InputError("causal_lm_entropy_objective needs at least one task")
    model.eval().requires_grad_(False)
    pad = pad_id_of(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    streams: list[tuple[str, list[Any]]] = []
    for name, (prompt, split) in tasks.items():
        if isinstance(split, ChoiceSplit):
            items: list[Any] = choice_requests(tokenizer, split, prompt)
        elif isinstance(split, TextSplit):
            items = [([prefix_token(tokenizer)], ids[:max_length]) for ids in
                     (encode(tokenizer, text) for text in split.texts) if ids]
        elif isinstance(split, AnswerSplit):  # the question as the whole input: a placeholder target after it
            items = [(encode(tokenizer, q) if q else [prefix_token(tokenizer)], [pad]) for q in split.questions]
        if not items:
            raise InputError(f"task {name!r} has no examples")
        order = torch.randperm(len(items), generator=generator).tolist()
        streams.append((split.kind, [items[i] for i in order]))

    def objective(merged: Mapping[str, Tensor], step: int) -> Tensor:
        total = torch.zeros((), device=device_of(model))
        for kind, items in streams:
            size = min(batch_size, len(items))
            batch = [items[(step * size + j) % len(items)] for j in range(size)]
            if kind == "multiple_choice":
                flat = [request for requests in batch for request in requests]
                scores = request_log_likelihoods(model, flat, max_length, pad, weights=merged)
                total = total + _entropy(as_logits(scores, [len(r) for r in batch]).log_softmax(dim=-1)).mean()
                continue
            ids, mask, _ = padded_batch(batch, max_length, pad, device_of(model))
            log_probs = forward_logits(model, ids, mask, merged).float().log_softmax(dim=-1)
            if kind == "perplexity":
                total = total + (_entropy(log_probs) * mask).sum() / mask.sum()
            else:  # the distribution after the question's last token: the first answer token
                last = mask.sum(dim=1) - 1
                total = total + _entropy(log_probs[torch.arange(len(batch)), last]).mean()
        return total

    return objective
