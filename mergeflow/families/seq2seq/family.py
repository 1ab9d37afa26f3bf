"""seq2seq: Flan-T5 (any Hugging Face seq2seq LM) as a classifier by scoring label words (the papers' NLP setting).

Model directory: config.json, tokenizer files and model.safetensors (every tensor, tied duplicates once, is merged).
Task data (`mergeflow.families.seq2seq.data`): task.json (GLUE names fill in their template, label words and metric)
and train/validation/test.parquet with the template's fields and label. A task's "head" is its prompt template,
label words and metric (a small JSON file), so every model is scored with the same prompts; the score is the
task's primary GLUE metric (Matthews for CoLA, Spearman for STS-B, else accuracy).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mergeflow.errors import ConfigError
from mergeflow.families.base import Family, LoadedModel, TaskData, require_files
from mergeflow.finetune import FinetuneResult, FinetuneSettings
from mergeflow.statistics import Statistics
from mergeflow.task_vectors import Objective


def save_prompt(task: Any, path: Path) -> None:
    """Write a GlueTask as the JSON "head" of a seq2seq task."""
    path.write_text(json.dumps(dataclasses.asdict(task), indent=2))


def load_prompt(path: Path, label: str) -> Any:
    from mergeflow.families.seq2seq.scoring import GlueTask

    try:
        raw = json.loads(Path(path).read_text())
        return GlueTask(name=raw["name"], template=raw["template"], label_words=tuple(raw["label_words"]),
                        metric=raw["metric"], values=tuple(raw["values"]) if raw.get("values") is not None else None)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{label}: not a seq2seq task prompt (JSON with name, template, label_words, metric): "
                          f"{exc}") from None


class Seq2SeqFamily(Family):
    name = "seq2seq"
    head_suffix = ".json"
    dataset_layout = ("task.json (name; template, label_words, metric unless a GLUE task) and "
                      "train/validation/test.parquet with the template's fields and label")

    def check_model_dir(self, directory: Path, label: str, *, weights: bool = True) -> None:
        needed = ("config.json", "model.safetensors") if weights else ("config.json",)
        require_files(directory, label, needed,
                      "a Hugging Face seq2seq folder: config.json, tokenizer files, model.safetensors")

    def load(self, model_dir: Path, state_dict: Mapping[str, Tensor] | None, device: torch.device) -> LoadedModel:
        from mergeflow.families.seq2seq.model import load_seq2seq_model

        model, tokenizer = load_seq2seq_model(model_dir, state_dict, device=device)
        return LoadedModel(model, tokenizer)

    def read_dataset(self, directory: Path, name: str, splits: Sequence[str] | None = None) -> TaskData:
        from mergeflow.families.seq2seq.data import read_seq2seq_task
        from mergeflow.errors import InputError, ObjectNotFoundError

        try:
            task = read_seq2seq_task(str(directory), splits=splits)
        except (InputError, ObjectNotFoundError, FileNotFoundError) as exc:
            raise ConfigError(f"{exc} (expected {self.dataset_layout})") from None
        return TaskData(name, list(task.task.label_words), dict(task.splits), prompt=task.task)

    def split_size(self, split: Any) -> int:
        return len(split.texts)

    def first(self, split: Any, count: int, start: int = 0) -> Any:
        return dataclasses.replace(split, texts=split.texts[start:count], labels=split.labels[start:count])

    def build_head(self, task: TaskData, model_dir: Path, settings: Any, device: torch.device, path: Path) -> None:
        """The task's prompt: template, label words, metric (from its dataset)."""
        save_prompt(task.prompt, path)

    def load_head(self, path: Path, label: str) -> Any:
        return load_prompt(path, label)

    def finetune(self, model: LoadedModel, head: Any, split: Any, settings: FinetuneSettings, *, progress: bool,
                 checkpoint_dir: str | None, storage_options: Mapping[str, Any] | None) -> FinetuneResult:
        from mergeflow.families.seq2seq.model import finetune_seq2seq

        return finetune_seq2seq(model.module, model.tokenizer, head, split.texts, split.labels, settings,
                                device=model.device, progress=progress, checkpoint_dir=checkpoint_dir,
                                storage_options=storage_options)

    def statistics(self, model: LoadedModel, head: Any, split: Any, kinds: Sequence[str], settings: Any
                   ) -> Statistics:
        """Every linear layer's Grams except the LM head's: its output Gram is vocabulary-squared (32128² floats,
        4 GB, for Flan-T5), so the methods average `lm_head.weight` like any tensor without statistics."""
        from mergeflow.families.seq2seq.model import seq2seq_statistics
        from mergeflow.selection import ParamKind, ParameterSelection

        selection = ParameterSelection(kinds=frozenset(ParamKind), exclude=(r"^lm_head\.",))
        return seq2seq_statistics(model.module, model.tokenizer, head, split.texts, split.labels, kinds=kinds,
                                  fisher=settings.fisher, max_examples=settings.max_examples,
                                  batch_size=settings.batch_size, max_length=settings.max_length, seed=settings.seed,
                                  device=model.device, progress=True, selection=selection)

    def evaluate(self, model: LoadedModel, tasks: Mapping[str, tuple[Any, Any]], settings: Any) -> dict[str, float]:
        from mergeflow.families.seq2seq.model import evaluate_seq2seq

        return evaluate_seq2seq(model.module, model.tokenizer,
                                {name: (prompt, split.texts, split.labels) for name, (prompt, split) in tasks.items()},
                                batch_size=settings.batch_size, max_length=settings.max_length, progress=True)

    def objective(self, model: LoadedModel, tasks: Mapping[str, tuple[Any, Any]], settings: Any,
                  batch_size: int = 16) -> Objective:
        from mergeflow.families.seq2seq.model import seq2seq_entropy_objective

        return seq2seq_entropy_objective(model.module, model.tokenizer,
                                         {name: (prompt, split.texts) for name, (prompt, split) in tasks.items()},
                                         batch_size=batch_size, max_length=settings.max_length)
