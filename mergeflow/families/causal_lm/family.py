"""causal_lm: Hugging Face causal language models (Llama, Qwen2, Mistral, GPT-2, any `AutoModelForCausalLM`).

Model directory (`model_dir`): config.json, tokenizer files, model.safetensors or a sharded index with its shards;
bf16 stays bf16. Task data (`data`): train/validation/test.jsonl with multiple-choice, plain-text or short-answer
examples. A task's "head" is its prompt (`scoring.TaskPrompt`: the kind, the delimiter between question and answer,
the generation budget), a small JSON file. Scores (`scoring`): acc_norm for multiple choice, 1 / perplexity for
text, exact match for short answers; all higher-is-better, so sweeps, `auto` and registration choose as for every
family. Fine-tuning trains every parameter (`training`), or a LoRA adapter (`lora`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mergeflow.errors import ConfigError
from mergeflow.families.base import Family, LoadedModel, TaskData
from mergeflow.families.causal_lm import data as task_data
from mergeflow.finetune import FinetuneResult, FinetuneSettings
from mergeflow.statistics import Statistics
from mergeflow.task_vectors import Objective


class CausalLMFamily(Family):
    name = "causal_lm"
    head_suffix = ".json"
    dataset_layout = task_data.LAYOUT

    def check_model_dir(self, directory: Path, label: str, *, weights: bool = True) -> None:
        from mergeflow.families.causal_lm.model_dir import check_model_dir

        check_model_dir(directory, label, weights=weights)

    def load(self, model_dir: Path, state_dict: Mapping[str, Tensor] | None, device: torch.device) -> LoadedModel:
        from mergeflow.families.causal_lm.model_dir import load_causal_lm

        model, tokenizer = load_causal_lm(model_dir, state_dict, device=device)
        return LoadedModel(model, tokenizer)

    def read_dataset(self, directory: Path, name: str, splits: Sequence[str] | None = None) -> TaskData:
        from mergeflow.families.causal_lm.scoring import TaskPrompt

        kind, found = task_data.read_causal_task(directory, splits, relative=True)
        return TaskData(name, [], dict(found), prompt=TaskPrompt(kind))

    def split_size(self, split: Any) -> int:
        return task_data.split_size(split)

    def first(self, split: Any, count: int, start: int = 0) -> Any:
        return task_data.first(split, count, start)

    def build_head(self, task: TaskData, model_dir: Path, settings: Any, device: torch.device, path: Path) -> None:
        """The task's prompt for its kind (delimiter " ", 32 new tokens and a newline stop for short answers)."""
        from mergeflow.families.causal_lm.scoring import save_prompt

        save_prompt(task.prompt, path)

    def load_head(self, path: Path, label: str) -> Any:
        from mergeflow.families.causal_lm.scoring import load_prompt

        return load_prompt(path, label)

    def check_head(self, head: Any, task: TaskData, label: str) -> None:
        if head.kind != task.prompt.kind:
            raise ConfigError(f"{label}: a prompt for a {head.kind} task, but task {task.name!r} is {task.prompt.kind}")

    def finetune(self, model: LoadedModel, head: Any, split: Any, settings: FinetuneSettings, *, progress: bool,
                 checkpoint_dir: str | None, storage_options: Mapping[str, Any] | None) -> FinetuneResult:
        from mergeflow.families.causal_lm.training import finetune_causal_lm

        return finetune_causal_lm(model.module, model.tokenizer, head, split, settings, device=model.device,
                                  progress=progress, checkpoint_dir=checkpoint_dir, storage_options=storage_options)

    def finetune_adapter(self, model: LoadedModel, head: Any, split: Any, settings: FinetuneSettings,
                         lora: Mapping[str, Any], *, progress: bool, checkpoint_dir: str | None,
                         storage_options: Mapping[str, Any] | None) -> tuple[FinetuneResult, dict[str, Any]]:
        from mergeflow.families.causal_lm.lora import finetune_causal_lm_lora

        return finetune_causal_lm_lora(model.module, model.tokenizer, head, split, settings, lora,
                                       device=model.device, progress=progress, checkpoint_dir=checkpoint_dir,
                                       storage_options=storage_options)

    def statistics(self, model: LoadedModel, head: Any, split: Any, kinds: Sequence[str], settings: Any
                   ) -> Statistics:
        from mergeflow.families.causal_lm.training import causal_lm_statistics

        return causal_lm_statistics(model.module, model.tokenizer, head, split, kinds=kinds, fisher=settings.fisher,
                                    max_examples=settings.max_examples, batch_size=settings.batch_size,
                                    max_length=settings.max_length, seed=settings.seed, progress=True)

    def evaluate(self, model: LoadedModel, tasks: Mapping[str, tuple[Any, Any]], settings: Any) -> dict[str, float]:
        """Per task the primary score: acc_norm, 1 / perplexity or exact match (`scoring`), computed in fp32 on a CPU
        without bf16 units (`model_dir.for_inference`)."""
        from mergeflow.families.causal_lm.model_dir import for_inference
        from mergeflow.families.causal_lm.scoring import evaluate_causal_lm

        return evaluate_causal_lm(for_inference(model.module), model.tokenizer, tasks, batch_size=settings.batch_size,
                                  max_length=settings.max_length, progress=True)

    def metric_of(self, credits: Sequence[int]) -> float:
        return sum(credits) / len(credits)

    def score_examples(self, model: LoadedModel, tasks: Mapping[str, tuple[Any, Any]], settings: Any
                       ) -> dict[str, tuple[float, list[int] | None]]:
        """Per task (the primary score, each example's credit 1/0; None for perplexity, not a mean of credits)."""
        from mergeflow.families.causal_lm.model_dir import for_inference
        from mergeflow.families.causal_lm.scoring import score_causal_lm

        return score_causal_lm(for_inference(model.module), model.tokenizer, tasks, batch_size=settings.batch_size,
                               max_length=settings.max_length, progress=True)

    def objective(self, model: LoadedModel, tasks: Mapping[str, tuple[Any, Any]], settings: Any,
                  batch_size: int = 16) -> Objective:
        from mergeflow.families.causal_lm.training import causal_lm_entropy_objective

        return causal_lm_entropy_objective(model.module, model.tokenizer, tasks, batch_size=batch_size,
                                           max_length=settings.max_length)
