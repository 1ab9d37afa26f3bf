"""What the pipeline's stages need from a model family, as one small interface.

A family knows how its pretrained model directory is laid out, how its task data is stored and read, how a task's
frozen head is made (a linear probe, a CLIP zero-shot head, the label words of a seq2seq task), and how a model of
the family is fine-tuned, measured for statistics, scored and turned into AdaMerging's objective. Stages
(`mergeflow.stages`) do the object-store work and call these on local paths; the merge methods never see a family:
they work on the checkpoint's tensors alone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mergeflow.errors import ConfigError
from mergeflow.finetune import FinetuneResult, FinetuneSettings
from mergeflow.statistics import Statistics
from mergeflow.task_vectors import Objective


def device_of(module: nn.Module) -> torch.device:
    """The device a module's parameters are on (its first parameter's)."""
    return next(module.parameters()).device


def listed_keys(keys: Sequence[str]) -> str:
    """The first 8 of `keys` and their count, for an error message."""
    return f"{list(keys[:8])}{' ...' if len(keys) > 8 else ''} ({len(keys)})"


def require_files(directory: Path, label: str, names: Sequence[str], layout: str) -> None:
    """ConfigError naming `label` and every missing file of `names` in the model directory."""
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        raise ConfigError(f"{label}: no {', '.join(missing)} in the model directory ({layout})")


@dataclass(frozen=True)
class TaskData:
    """One task's data as a family reads it: class names (or label words) and the splits asked for."""

    name: str
    class_names: list[str]
    splits: dict[str, Any]  # split name -> the family's split type
    prompt: Any = None  # seq2seq: the task's template, label words and metric (a GlueTask)


@dataclass
class LoadedModel:
    """A model of the family with the weights under evaluation, ready on its device (eval mode)."""

    module: nn.Module  # whose weights are the checkpoint's (what fine-tuning trains)
    tokenizer: Any = None

    @property
    def device(self) -> torch.device:
        return device_of(self.module)


class Family(ABC):
    """The family-specific half of every stage; see the module docstring."""

    name: ClassVar[str]
    head_suffix: ClassVar[str] = ".safetensors"  # file type of the stored head
    builtin_tasks: ClassVar[tuple[str, ...]] = ()  # tasks whose real data ships with Mergeflow
    builtin_models: ClassVar[tuple[str, ...]] = ()
    dataset_layout: ClassVar[str] = ""  # one line for error messages

    # ------------------------------------------------------------------ the pretrained model directory
    def write_builtin_model(self, name: str, directory: Path) -> None:
        """Write built-in model `name` (one of `builtin_models`) into `directory` in this family's layout."""
        raise ConfigError(f"model.pretrained: {name!r} is not a built-in {self.name} model; give the URI of a model "
                          "directory")

    @abstractmethod
    def check_model_dir(self, directory: Path, label: str, *, weights: bool = True) -> None:
        """ConfigError naming `label` and the missing file when `directory` is not this family's layout
        (`weights=False`: its model.safetensors may be absent, the weights come from elsewhere)."""

    @abstractmethod
    def load(self, model_dir: Path, state_dict: Mapping[str, Tensor] | None, device: torch.device) -> LoadedModel:
        """The model of `model_dir` with `state_dict` (the checkpoint's names; None: the directory's weights)."""

    # ------------------------------------------------------------------ task data
    def write_builtin_dataset(self, task: str, sizes: Mapping[str, int], seed: int, cache_dir: Path,
                              directory: Path) -> None:
        raise ConfigError(f"task {task!r} has no built-in {self.name} data: give its `dataset`")

    @abstractmethod
    def read_dataset(self, directory: Path, name: str, splits: Sequence[str] | None = None) -> TaskData:
        """The task stored at `directory` (only `splits`; None: every split, []: none, a layout check); a
        ConfigError says what is wrong (the caller names the dataset)."""

    @abstractmethod
    def split_size(self, split: Any) -> int: ...

    @abstractmethod
    def first(self, split: Any, count: int, start: int = 0) -> Any:
        """The split cut to its first `count` examples, less the first `start` of them."""

    def input_digests(self, split: Any) -> list[str]:
        """Each example's input content digest (labels aside): what finds a validation example that is also a
        training example. Texts (or questions) by their whitespace-normalised text, images by their pixels."""
        from mergeflow.hygiene import input_digest

        for field in ("texts", "questions", "images"):
            if (inputs := getattr(split, field, None)) is not None:
                return [input_digest(x) for x in inputs]
        raise NotImplementedError(f"{type(self).__name__}: its splits have no texts, questions or images")

    # ------------------------------------------------------------------ heads
    @abstractmethod
    def build_head(self, task: TaskData, model_dir: Path, settings: Any, device: torch.device, path: Path) -> None:
        """Make the task's frozen head from the pretrained model and write it to `path`."""

    @abstractmethod
    def load_head(self, path: Path, label: str) -> Any:
        """A stored head; ConfigError naming `label` when the file is not one."""

    def check_head(self, head: Any, task: TaskData, label: str) -> None:
        """ConfigError naming `label` when the head does not fit the task's classes."""

    # ------------------------------------------------------------------ the stages' work
    @abstractmethod
    def finetune(self, model: LoadedModel, head: Any, split: Any, settings: FinetuneSettings, *, progress: bool,
                 checkpoint_dir: str | None, storage_options: Mapping[str, Any] | None) -> FinetuneResult: ...

    def finetune_adapter(self, model: LoadedModel, head: Any, split: Any, settings: FinetuneSettings,
                         lora: Mapping[str, Any], *, progress: bool, checkpoint_dir: str | None,
                         storage_options: Mapping[str, Any] | None) -> tuple[FinetuneResult, dict[str, Any]]:
        """Train a LoRA adapter (`lora`: r, alpha, dropout, target_modules) instead of every parameter; returns the
        result, whose state dict is the adapter's tensors under PEFT's names, and its adapter_config.json."""
        raise ConfigError(f"finetune.lora: the {self.name} family has no LoRA fine-tuning; leave lora empty")

    @abstractmethod
    def statistics(self, model: LoadedModel, head: Any, split: Any, kinds: Sequence[str], settings: Any
                   ) -> Statistics: ...

    @abstractmethod
    def evaluate(self, model: LoadedModel, tasks: Mapping[str, tuple[Any, Any]], settings: Any) -> dict[str, float]:
        """Per task the primary metric (accuracy for classification) of `model` on the given splits."""

    def score_examples(self, model: LoadedModel, tasks: Mapping[str, tuple[Any, Any]], settings: Any
                       ) -> dict[str, tuple[float, list[int] | None]]:
        """Per task (the primary metric, each example's credit 1/0 where the metric is their mean, else None): what
        a search compares candidates on, example by example. By default no credits (`evaluate` only)."""
        return {name: (value, None) for name, value in self.evaluate(model, tasks, settings).items()}

    def metric_of(self, credits: Sequence[int]) -> float:
        """The primary metric of examples scored with these credits, computed as `score_examples` computes it (a
        score continued on more examples: the earlier ones' credits and the new ones')."""
        from mergeflow.evaluate import scored

        return scored(torch.tensor(list(credits), dtype=torch.bool))[0]

    @abstractmethod
    def objective(self, model: LoadedModel, tasks: Mapping[str, tuple[Any, Any]], settings: Any,
                  batch_size: int = 16) -> Objective:
        """AdaMerging's entropy objective over the splits' inputs (labels never read)."""
