"""Hugging Face seq2seq LMs (Flan-T5, any `AutoModelForSeq2SeqLM`) as rank classifiers over label words: loading and
saving model folders, fine-tuning, evaluation, statistics and AdaMerging's entropy objective.

A model folder holds `config.json`, the tokenizer files and `model.safetensors`. Tied tensors (T5's `shared.weight`
with `encoder.embed_tokens.weight`, `decoder.embed_tokens.weight` and, when tied, `lm_head.weight`) are one tensor
under several names; `seq2seq_state_dict` keeps the first name in state-dict order (`shared.weight`), so merged
and expert checkpoints hold every tensor once, and loading accepts a file without the other names.

Every task scores its label words with `candidate_log_likelihoods` (`mergeflow.families.seq2seq.scoring`): the [B, K]
log-likelihoods act as the logits of a K-way classifier everywhere (training loss, Fisher, entropy), so the model
is trained, measured and adapted on exactly the choice it is evaluated on.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.func import functional_call

from mergeflow.families.seq2seq.scoring import (
    GlueTask,
    _target_ids,
    candidate_log_likelihoods,
    glue_metrics,
    predictions_from_scores,
    score_label_words,
)
from mergeflow.checkpoints.safetensors_format import save_safetensors
from mergeflow.errors import CheckpointError, InputError
from mergeflow.families.base import device_of, listed_keys
from mergeflow.finetune import FinetuneResult, FinetuneSettings, TrainingData, train_classifier
from mergeflow.selection import ParamKind, ParameterSelection
from mergeflow.statistics import KINDS, FisherLabels, Statistics, collect_statistics, split_statistic_key
from mergeflow.task_vectors import Objective

WEIGHTS_NAME = "model.safetensors"

# ---------------------------------------------------------------------------------------------- tied tensors


def _identity(tensor: Tensor) -> tuple[Any, ...] | None:
    """What makes two state-dict entries one tensor (same storage, offset, shape, strides); None for empty ones."""
    if tensor.numel() == 0 or tensor.device.type == "meta":
        return None
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride(),
            tensor.dtype)


def _canonical_names(state: Mapping[str, Tensor]) -> dict[str, str]:
    """Every state-dict name -> the first name (in state-dict order) of the tensor it shares storage with."""
    first: dict[Any, str] = {}
    canonical = {}
    for name, tensor in state.items():
        identity = _identity(tensor)
        canonical[name] = first.setdefault(identity, name) if identity is not None else name
    return canonical


def seq2seq_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict as CPU, contiguous copies, each tied tensor once (under its first name in
    state-dict order: T5 keeps `shared.weight`), keys sorted."""
    state = model.state_dict()
    kept = {name for name, first in _canonical_names(state).items() if name == first}
    return {name: state[name].detach().to("cpu", copy=True).contiguous() for name in sorted(kept)}


def _untie(model: nn.Module, name: str, partner: str, label: str) -> None:
    """Give `name` its own parameter (same shape and dtype), no longer shared with `partner`."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, leaf)
    setattr(module, leaf, nn.Parameter(torch.empty_like(old), requires_grad=old.requires_grad))
    if model.get_parameter(partner) is model.get_parameter(name):  # one module under two names: cannot untie
        raise CheckpointError(label, f"differs from {partner!r}, which the model shares it with", tensor=name)
    tied = getattr(model, "all_tied_weights_keys", None)  # transformers 5 re-ties what this mapping names
    if isinstance(tied, dict):
        tied.pop(name, None)


def _fit_weights(model: nn.Module, weights: Mapping[str, Tensor], label: str) -> dict[str, Tensor]:
    """`weights` completed for a strict `load_state_dict`: an absent tied name takes the value of a present name of
    the same tensor; a present tied name whose values differ from the first present one is untied (its own
    parameter, as transformers' `from_pretrained` does for T5 v1.1 / Flan-T5 files with a separate `lm_head`).
    CheckpointError naming the file and keys when a key is missing (and tied to no present one), unexpected, or of
    the wrong shape."""
    own = model.state_dict()
    canonical = _canonical_names(own)
    groups: dict[str, list[str]] = {}
    for name, first in canonical.items():
        groups.setdefault(first, []).append(name)
    unexpected = sorted(set(weights) - set(own))
    missing = sorted(name for name in own if name not in weights
                     and not any(alias in weights for alias in groups[canonical[name]]))
    if missing or unexpected:
        raise CheckpointError(label, f"state dict does not fit the model: missing keys {listed_keys(missing)}, "
                                     f"unexpected keys {listed_keys(unexpected)}", tensor=(missing or unexpected)[0])
    for name, tensor in weights.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise CheckpointError(label, f"shape {tuple(tensor.shape)}, but the model has {tuple(own[name].shape)}",
                                  tensor=name)
    complete = dict(weights)
    for names in groups.values():
        present = [name for name in names if name in weights]
        for name in present[1:]:
            if not torch.equal(weights[name], weights[present[0]]):
                _untie(model, name, present[0], label)
        for name in names:
            complete.setdefault(name, weights[present[0]])
    return complete


def load_seq2seq_model(model_dir: Path, state_dict: Mapping[str, Tensor] | None = None,
                       device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """The model of `model_dir/config.json` (`AutoModelForSeq2SeqLM.from_config`) with the weights of
    `model_dir/model.safetensors`, or of `state_dict`, loaded strictly (tied names may be absent when a name of
    the same tensor is present; a tied name holding other values than its partner is untied), and
    `AutoTokenizer.from_pretrained(model_dir)`. Offline; eval mode on `device`."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(str(model_dir / "config.json"), "no such file (a seq2seq model folder needs "
                                                              "config.json, tokenizer files and model.safetensors)")
    model = AutoModelForSeq2SeqLM.from_config(AutoConfig.from_pretrained(model_dir))
    if state_dict is None:
        path = model_dir / WEIGHTS_NAME
        if not path.is_file():
            raise CheckpointError(str(path), "no such file")
        weights, label = load_file(path), str(path)
    else:
        weights, label = dict(state_dict), f"<state dict for {model_dir}>"
    model.load_state_dict(_fit_weights(model, weights, label), strict=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model.to(device).eval(), tokenizer


def save_seq2seq_model_dir(model: nn.Module, tokenizer: Any, directory: Path) -> None:
    """Write `config.json`, the tokenizer files and `model.safetensors` (`seq2seq_state_dict`, deterministic
    bytes) into `directory`, which `load_seq2seq_model` reads back."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    partial = directory / f".{WEIGHTS_NAME}.partial"
    save_safetensors(seq2seq_state_dict(model), partial, metadata={"format": "pt"})
    os.replace(partial, directory / WEIGHTS_NAME)


# ---------------------------------------------------------------------------------------------- tasks


def _is_class_id(label: Any, classes: int) -> bool:
    try:
        return not isinstance(label, bool) and float(label).is_integer() and 0 <= int(label) < classes
    except (TypeError, ValueError, OverflowError):
        return False


def class_targets(task: GlueTask, labels: Sequence[float]) -> Tensor:
    """[N] int64 label-word index of each label: the class id of a classification (an integer in
    0..K-1, else InputError), or for a regression the index of the nearest of `task.values` (the lower on ties)."""
    if task.values is None:
        classes = len(task.label_words)
        for row, label in enumerate(labels):
            if not _is_class_id(label, classes):
                raise InputError(f"task {task.name!r}: label {label!r} of example {row} is not a class id "
                                 f"0..{classes - 1}")
        return torch.tensor([int(label) for label in labels], dtype=torch.int64)
    values = torch.tensor(task.values, dtype=torch.float64)
    try:
        targets = torch.as_tensor([float(label) for label in labels], dtype=torch.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"task {task.name!r}: a regression label is not a number: {exc}") from None
    bad = (~torch.isfinite(targets)).nonzero().flatten().tolist()
    if bad:
        raise InputError(f"task {task.name!r}: label {labels[bad[0]]!r} of example {bad[0]} is not a finite number")
    return (targets.unsqueeze(-1) - values).abs().argmin(dim=-1).to(torch.int64)


def _check_examples(task: GlueTask, texts: Sequence[str], labels: Sequence[float] | None = None) -> None:
    if not texts:
        raise InputError(f"task {task.name!r}: no texts")
    if labels is not None and len(labels) != len(texts):
        raise InputError(f"task {task.name!r}: {len(labels)} labels for {len(texts)} texts")


def _data_digest(task: GlueTask, texts: Sequence[str], labels: Sequence[float]) -> str:
    """sha256 of the label words (and values) and every (label, text) pair, so no checkpoint resumes on other data."""
    digest = hashlib.sha256()
    digest.update(repr((task.label_words, task.values)).encode())
    for text, label in zip(texts, labels, strict=True):
        digest.update(f"\n{label!r}\t{len(text)}\t".encode())
        digest.update(text.encode())
    return digest.hexdigest()


class _LabelWordLogits:
    """The "head" of rank classification: the label-word log-likelihoods are already the logits."""

    def logits(self, features: Tensor) -> Tensor:
        return features


def _tokenize(tokenizer: Any, texts: Sequence[str], max_length: int, device: torch.device,
              min_length: int = 0) -> tuple[Tensor, Tensor]:
    """Padded input ids and attention mask, at least `min_length` tokens wide (extra padding, masked out)."""
    inputs = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if ids.shape[1] < min_length:
        pad = min_length - ids.shape[1]
        ids = F.pad(ids, (0, pad), value=int(tokenizer.pad_token_id))
        mask = F.pad(mask, (0, pad), value=0)
    return ids.to(device), mask.to(device)


# ---------------------------------------------------------------------------------------------- fine-tuning


def finetune_seq2seq(model: nn.Module, tokenizer: Any, task: GlueTask, texts: Sequence[str],
                     labels: Sequence[float], settings: FinetuneSettings, *, device: str | torch.device = "cpu",
                     progress: bool = True, checkpoint_dir: str | None = None,
                     storage_options: Mapping[str, Any] | None = None) -> FinetuneResult:
    """Fine-tune `model` in place on `texts` (model inputs, already formatted with the task's template) with
    `mergeflow.finetune.train_classifier` (its schedule, checkpoints and resume); returns `seq2seq_state_dict`.

    Loss: cross-entropy over the label words, whose logits are the summed log-likelihoods of each word's target
    tokens (`candidate_log_likelihoods`), i.e. -log of the correct word's probability renormalised over the label
    words (rank classification). Unlike the teacher-forced LM loss on the correct word alone, it also pushes the
    other words down, matches the evaluation's argmax over the same scores, and trains a regression (STS-B) as a
    classification into the nearest grid value (`class_targets`). Texts are truncated to `settings.max_length`.
    """
    _check_examples(task, texts, labels)
    device = torch.device(device)
    model.to(device)
    candidates = _target_ids(tokenizer, task.label_words)

    def features(batch: Tensor) -> Tensor:
        ids, mask = _tokenize(tokenizer, [texts[int(i)] for i in batch], settings.max_length, device)
        return candidate_log_likelihoods(model, ids, mask, candidates)

    data = TrainingData(len(texts), class_targets(task, labels), features, _data_digest(task, texts, labels))
    return train_classifier(model, _LabelWordLogits(), data, settings,  # type: ignore[arg-type]
                            lambda: seq2seq_state_dict(model), device=device, progress=progress,
                            checkpoint_dir=checkpoint_dir, storage_options=storage_options)


# ---------------------------------------------------------------------------------------------- statistics


def _tied_aliases(model: nn.Module) -> list[str]:
    """State-dict names that `seq2seq_state_dict` drops (later names of a tied tensor, e.g. a tied lm_head)."""
    return [name for name, first in _canonical_names(model.state_dict()).items() if name != first]


def _without_aliases(model: nn.Module, selection: ParameterSelection | None) -> ParameterSelection:
    """`selection` (default: every linear layer) minus the layers whose weight is a tied alias, whose Grams would
    be named after a tensor no checkpoint holds."""
    exclude = tuple(f"^{re.escape(name)}$" for name in _tied_aliases(model))
    if selection is None:
        return ParameterSelection(kinds=frozenset(ParamKind), exclude=exclude)
    return ParameterSelection(kinds=selection.kinds, include=tuple(selection.include),
                              exclude=(*selection.exclude, *exclude))


def seq2seq_statistics(model: nn.Module, tokenizer: Any, task: GlueTask, texts: Sequence[str],
                       labels: Sequence[float], *, kinds: Sequence[str] = KINDS, fisher: FisherLabels = "empirical",
                       max_examples: int = 1000, batch_size: int = 16, max_length: int = 512, seed: int = 0,
                       device: str | torch.device = "cpu", progress: bool = False,
                       selection: ParameterSelection | None = None) -> Statistics:
    """Statistics (`mergeflow.statistics`) of `model` on the first `max_examples` texts, with the label-word
    log-likelihoods as the logits and `class_targets(task, labels)` as the labels; keys are the model's parameter
    names, all of them in `seq2seq_state_dict` (the tied lm_head of T5 is left out of the Grams; the Fisher of
    `shared.weight` covers every use of the tied tensor). `selection` narrows the Gram layers.

    Texts are batched by length. Encoder inputs are padded to more tokens than the longest label word, so the
    attention mask (which keeps padding out of the Grams) only ever matches encoder-shaped layer inputs, never
    the decoder's.
    """
    _check_examples(task, texts, labels)
    device = torch.device(device)
    model.to(device)
    candidates = _target_ids(tokenizer, task.label_words)
    width = max(len(c) for c in candidates) + 1
    targets = class_targets(task, labels)
    count = min(len(texts), max_examples)
    order = sorted(range(count), key=lambda i: len(texts[i]))

    def batches() -> Iterator[dict[str, Tensor]]:
        for start in range(0, count, batch_size):
            chunk = order[start:start + batch_size]
            ids, mask = _tokenize(tokenizer, [texts[i] for i in chunk], max_length, device, min_length=width)
            yield {"input_ids": ids, "attention_mask": mask, "labels": targets[chunk].to(device)}

    def logits(batch: Mapping[str, Tensor]) -> Tensor:
        return candidate_log_likelihoods(model, batch["input_ids"], batch["attention_mask"], candidates)

    stats = collect_statistics(model, batches(), logits, kinds=kinds, fisher=fisher, max_examples=max_examples,
                               seed=seed, selection=_without_aliases(model, selection), progress=progress)
    kept = set(_canonical_names(model.state_dict()).values())
    stray = sorted(key for key in stats.tensors if split_statistic_key(key)[0] not in kept)
    if stray:
        raise CheckpointError("<statistics>", f"statistics of tensors outside the checkpoint: {listed_keys(stray)}",
                              tensor=stray[0])
    return stats


# ---------------------------------------------------------------------------------------------- evaluation, AdaMerging


def evaluate_seq2seq(model: nn.Module, tokenizer: Any,
                     tasks: Mapping[str, tuple[GlueTask, Sequence[str], Sequence[float]]], *, batch_size: int = 16,
                     max_length: int = 512, progress: bool = False) -> dict[str, float]:
    """Each task's primary GLUE metric (`glue_metrics(...)["score"]`: accuracy, Matthews or Spearman) of the
    label word `model` scores highest for each text, on the model's device."""
    results = {}
    for name, (task, texts, labels) in tasks.items():
        _check_examples(task, texts, labels)
        scores = score_label_words(model, tokenizer, texts, task.label_words, batch_size=batch_size,
                                   max_length=max_length, progress=progress)
        results[name] = glue_metrics(task, predictions_from_scores(task, scores), labels)["score"]
    return results


class _Scorer(nn.Module):
    """`candidate_log_likelihoods` as one forward, so `functional_call` swaps the weights for all of it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, candidates: list[list[int]]) -> Tensor:
        return candidate_log_likelihoods(self.model, input_ids, attention_mask, candidates)


def seq2seq_entropy_objective(model: nn.Module, tokenizer: Any,
                              tasks: Mapping[str, tuple[GlueTask, Sequence[str]]], *, batch_size: int = 16,
                              max_length: int = 512, seed: int = 0) -> Objective:
    """AdaMerging's objective: `(merged, step)` runs `model` with the `merged` tensors (names as in
    `seq2seq_state_dict`; absent ones keep the model's own; the tied names follow `shared.weight`) on step `step`'s
    batch of every task's texts, and returns the sum over tasks of the mean Shannon entropy of the softmax over
    its label words' log-likelihoods. Each task cycles through its texts in a seeded order; labels are never
    read. The model is frozen (eval, no gradients) and used on its own device."""
    if not tasks:
        raise InputError("seq2seq_entropy_objective needs at least one task")
    model.eval().requires_grad_(False)
    scorer = _Scorer(model)
    device = device_of(model)
    generator = torch.Generator().manual_seed(seed)
    streams = []
    for name, (task, texts) in tasks.items():
        if not texts:
            raise InputError(f"task {name!r} has no texts")
        order = torch.randperm(len(texts), generator=generator).tolist()
        streams.append(([texts[i] for i in order], _target_ids(tokenizer, task.label_words)))

    def objective(merged: Mapping[str, Tensor], step: int) -> Tensor:
        weights = {f"model.{key}": value for key, value in merged.items()}
        total = torch.zeros((), device=device)
        for texts, candidates in streams:
            size = min(batch_size, len(texts))
            batch = [texts[(step * size + j) % len(texts)] for j in range(size)]
            ids, mask = _tokenize(tokenizer, batch, max_length, device)
            log_probs = functional_call(scorer, weights, (ids, mask, candidates)).log_softmax(dim=-1)
            total = total - (log_probs.exp() * log_probs).sum(dim=-1).mean()
        return total

    return objective
