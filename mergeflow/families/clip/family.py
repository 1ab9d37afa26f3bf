"""open_clip and hf_clip: CLIP vision towers under frozen zero-shot heads (the papers' vision setting).

Model directory (`mergeflow.families.clip.model_dir`): the family's config file, `model.safetensors` with exactly
the vision tower's tensors (what is fine-tuned and merged) and, for zero-shot heads, `text.safetensors` with the
text tower. Task data (`mergeflow.families.clip.data`): classes.json and <split>.parquet with image bytes and label,
or a <split>/<class>/<image> folder tree. Heads are CLIP zero-shot heads from the class names and the task's prompt
templates (`mergeflow.families.clip.templates`; tasks without their own templates use "a photo of a {}."), unless
the task gives its own head file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from mergeflow.errors import ConfigError
from mergeflow.families.base import Family, LoadedModel, TaskData, require_files
from mergeflow.families.text.family import check_classification_head, load_classification_head
from mergeflow.finetune import FinetuneResult, FinetuneSettings
from mergeflow.statistics import Statistics
from mergeflow.task_vectors import Objective

GENERIC_TEMPLATES = ("a photo of a {}.",)


def templates(task: str) -> tuple[str, ...]:
    """The task's CLIP prompt templates, or the generic one for a task without its own."""
    from mergeflow.families.clip.templates import templates_for

    try:
        return templates_for(task)
    except ConfigError:
        return GENERIC_TEMPLATES


class ClipFamily(Family):
    kind: Literal["open_clip", "hf_clip"]
    config_file: str
    builtin_tasks = ("digits", "mnist")
    dataset_layout = ("classes.json and train/validation/test.parquet with columns image (bytes), label; or "
                      "train/validation/test/<class name>/<image files>")

    def check_model_dir(self, directory: Path, label: str, *, weights: bool = True) -> None:
        from mergeflow.families.clip.model_dir import check_clip_model_dir

        if weights:
            check_clip_model_dir(directory, self.kind, label=label)
        else:
            require_files(directory, label, (self.config_file,), f"the {self.name} layout")

    def load(self, model_dir: Path, state_dict: Mapping[str, Tensor] | None, device: torch.device) -> LoadedModel:
        from mergeflow.families.clip.model_dir import load_clip_image_encoder

        return LoadedModel(load_clip_image_encoder(model_dir, self.kind, state_dict, device=device))

    def write_builtin_dataset(self, task: str, sizes: Mapping[str, int], seed: int, cache_dir: Path,
                              directory: Path) -> None:
        from mergeflow.families.clip.data import ImageSplitSizes, load_digits_task, load_mnist_task, save_image_task

        split_sizes = ImageSplitSizes(train=sizes["train"], validation=sizes["validation"], test=sizes["test"])
        if task == "digits":
            data = load_digits_task(seed=seed, sizes=split_sizes)
        elif task == "mnist":
            data = load_mnist_task(cache_dir=cache_dir, seed=seed, sizes=split_sizes)
        else:
            return super().write_builtin_dataset(task, sizes, seed, cache_dir, directory)
        save_image_task(data, str(directory))

    def read_dataset(self, directory: Path, name: str, splits: Sequence[str] | None = None) -> TaskData:
        from mergeflow.families.clip.data import read_image_task
        from mergeflow.errors import InputError, ObjectNotFoundError

        try:
            task = read_image_task(str(directory), name=name, splits=splits)
        except (InputError, ObjectNotFoundError, FileNotFoundError) as exc:
            raise ConfigError(f"{exc} (expected {self.dataset_layout})") from None
        return TaskData(name, list(task.class_names), dict(task.splits))

    def split_size(self, split: Any) -> int:
        return len(split.labels)

    def first(self, split: Any, count: int, start: int = 0) -> Any:
        from mergeflow.families.clip.data import ImageSplit

        return ImageSplit(images=[split.images[i] for i in range(start, min(count, len(split.labels)))],
                          labels=split.labels[start:count])

    def build_head(self, task: TaskData, model_dir: Path, settings: Any, device: torch.device, path: Path) -> None:
        """The CLIP zero-shot head of the task's class names and prompt templates."""
        from mergeflow.families.clip.model_dir import clip_zeroshot_head

        clip_zeroshot_head(model_dir, self.kind, task.class_names, templates(task.name), device=device).save(path)

    def load_head(self, path: Path, label: str) -> Any:
        return load_classification_head(path, label)

    def check_head(self, head: Any, task: TaskData, label: str) -> None:
        check_classification_head(head, task, label)

    def finetune(self, model: LoadedModel, head: Any, split: Any, settings: FinetuneSettings, *, progress: bool,
                 checkpoint_dir: str | None, storage_options: Mapping[str, Any] | None) -> FinetuneResult:
        from mergeflow.families.clip.training import finetune_image_encoder

        return finetune_image_encoder(model.module, head, split, settings, device=model.device, progress=progress,
                                      checkpoint_dir=checkpoint_dir, storage_options=storage_options)

    def statistics(self, model: LoadedModel, head: Any, split: Any, kinds: Sequence[str], settings: Any
                   ) -> Statistics:
        from mergeflow.families.clip.evaluation import image_classification_statistics

        return image_classification_statistics(model.module, head, split, kinds=kinds, fisher=settings.fisher,
                                               max_examples=settings.max_examples, batch_size=settings.batch_size,
                                               seed=settings.seed, device=model.device, progress=True)

    def evaluate(self, model: LoadedModel, tasks: Mapping[str, tuple[Any, Any]], settings: Any) -> dict[str, float]:
        from mergeflow.families.clip.evaluation import evaluate_image_encoder

        return evaluate_image_encoder(model.module, tasks, batch_size=settings.batch_size, device=model.device,
                                      progress=True)

    def score_examples(self, model: LoadedModel, tasks: Mapping[str, tuple[Any, Any]], settings: Any
                       ) -> dict[str, tuple[float, list[int] | None]]:
        from mergeflow.families.clip.evaluation import score_image_encoder

        return dict(score_image_encoder(model.module, tasks, batch_size=settings.batch_size, device=model.device,
                                        progress=True))

    def objective(self, model: LoadedModel, tasks: Mapping[str, tuple[Any, Any]], settings: Any,
                  batch_size: int = 16) -> Objective:
        from mergeflow.families.clip.evaluation import entropy_objective

        return entropy_objective(model.module, tasks, batch_size=batch_size)


class OpenClipFamily(ClipFamily):
    name = "open_clip"
    kind = "open_clip"
    config_file = "open_clip_config.json"


class HFClipFamily(ClipFamily):
    name = "hf_clip"
    kind = "hf_clip"
    config_file = "config.json"
