"""Task data for data-aware merges outside the flow (`mergeflow merge --data FILE`): each expert's dataset and
frozen head, turned into per-expert statistics (RegMean, Fisher, MaTS) or the unlabeled entropy objective
(AdaMerging, DOGE AM). Inputs are checked (count, layout, heads) before any model runs; statistics are kept in
the content cache under a key of the expert's, dataset's and head's digests and the settings, so a rerun reuses
them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergeflow.checkpoints import open_checkpoint
from mergeflow.config import MergeDataConfig
from mergeflow.errors import ConfigError
from mergeflow.families import Family, LoadedModel, TaskData, get_family
from mergeflow.storage import directory_digest, fetch_directory
from mergeflow.content_cache import ContentCache
from mergeflow.task_vectors import Objective, open_pool


@dataclass(frozen=True)
class TaskInputs:
    name: str
    task: TaskData
    head: Any
    dataset_sha256: str
    head_sha256: str


def load_dataset(name: str, uri: str, field: str, cache: ContentCache, options: Mapping[str, Any] | None,
                 splits: Sequence[str] | None = None, family: str = "hf_text") -> tuple[TaskData, str]:
    """Task `name`'s dataset directory in the family's layout, checked and read (only `splits`; None: all), with
    its content digest; ConfigError naming `field` when it is missing or malformed."""
    try:
        path, files = fetch_directory(uri, cache, options, recursive=True)
    except FileNotFoundError:
        raise ConfigError(f"{field}: dataset directory {uri} not found") from None
    try:
        return get_family(family).read_dataset(path, name, splits), directory_digest(files)
    except ConfigError as exc:
        raise ConfigError(f"{field}: dataset {uri}: {exc}") from None


def _head(uri: str, field: str, family: Family, cache: ContentCache, options: Mapping[str, Any] | None
          ) -> tuple[Any, str]:
    try:
        local = cache.fetch(uri, options)
    except FileNotFoundError:
        raise ConfigError(f"{field}: head {uri} not found") from None
    return family.load_head(local.path, f"{field}: {uri}"), local.sha256


def load_task_inputs(config: MergeDataConfig, experts: int, cache: ContentCache,
                     options: Mapping[str, Any] | None = None, splits: Sequence[str] | None = None
                     ) -> list[TaskInputs]:
    """Every task's data (only `splits` are read; None: all) and head, in the experts' order; ConfigError naming
    the field at fault."""
    if len(config.tasks) != experts:
        raise ConfigError(f"data config lists {len(config.tasks)} tasks for {experts} experts (one per --expert, "
                          "in the same order)")
    family = get_family(config.family)
    loaded = []
    for i, entry in enumerate(config.tasks):
        task, dataset_sha = load_dataset(entry.name, entry.dataset, f"tasks.{i}.dataset", cache, options, splits,
                                         config.family)
        head, head_sha = _head(entry.head, f"tasks.{i}.head", family, cache, options)
        family.check_head(head, task, f"tasks.{i}.head: {entry.head} (dataset {entry.dataset})")
        loaded.append(TaskInputs(entry.name, task, head, dataset_sha, head_sha))
    return loaded


def model_directory(config: MergeDataConfig, cache: ContentCache, options: Mapping[str, Any] | None = None) -> Path:
    try:
        path, _ = fetch_directory(config.model, cache, options)
    except FileNotFoundError:
        raise ConfigError(f"model: directory {config.model} not found") from None
    get_family(config.family).check_model_dir(path, f"model ({config.model})", weights=False)
    return path


def _state_dict(uri: str, cache: ContentCache, options: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
    with open_checkpoint(uri, storage_options=options, cache=cache) as ckpt:
        return {key: ckpt.get(key) for key in ckpt.keys()}


def _load(config: MergeDataConfig, model_dir: Path, state_dict: Mapping[str, torch.Tensor],
          device: str | torch.device) -> LoadedModel:
    return get_family(config.family).load(model_dir, state_dict, torch.device(device))


def build_objective(config: MergeDataConfig, base: str, tasks: Sequence[TaskInputs], cache: ContentCache,
                    options: Mapping[str, Any] | None = None, device: str | torch.device = "cpu") -> Objective:
    """The entropy objective on the `unlabeled_split` inputs (never labels) of every task, with the base weights."""
    model = _load(config, model_directory(config, cache, options), _state_dict(base, cache, options), device)
    splits = {t.name: (t.head, t.task.splits[config.unlabeled_split]) for t in tasks}
    return get_family(config.family).objective(model, splits, config, batch_size=config.batch_size)


def expert_statistics(config: MergeDataConfig, kinds: Sequence[str], experts: Sequence[str],
                      tasks: Sequence[TaskInputs], cache: ContentCache, options: Mapping[str, Any] | None = None,
                      device: str | torch.device = "cpu", progress: bool = False) -> list[str]:
    """Paths of each expert's statistics on its task's `statistics.split`, computed once per expert, data, head,
    kinds and settings (kept in the content cache)."""
    from mergeflow.statistics import save_statistics

    settings = config.statistics
    model_dir = model_directory(config, cache, options)
    paths = []
    for uri, inputs in zip(experts, tasks):
        with open_checkpoint(uri, storage_options=options, cache=cache) as ckpt:
            expert_sha = ckpt.digest
        key = json.dumps([expert_sha, inputs.dataset_sha256, inputs.head_sha256, list(kinds),
                          settings.model_dump(), config.family], sort_keys=True)
        path = cache.root / "statistics" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"
        if not path.exists():
            model = _load(config, model_dir, _state_dict(uri, cache, options), device)
            stats = get_family(config.family).statistics(model, inputs.head, inputs.task.splits[settings.split],
                                                         kinds, settings)
            stats.metadata.update({"task": inputs.name, "expert": uri})
            save_statistics(stats, path)
        paths.append(str(path))
    return paths


def kept_merge_name(method: str, point: Mapping[str, Any]) -> str:
    """The file name under which `ValidationScorer` keeps the merge of one point."""
    key = json.dumps([method, dict(point)], sort_keys=True, default=str)
    return f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"


class ValidationScorer:
    """Merged state dicts of grid points scored in memory on the first examples of each task's validation split
    (never its test split), over one open pool of the base, the experts and, for data-aware methods, their
    statistics; the update of a scaling-only coefficient is computed once per setting of the others. With
    `merged_dir`, a point that needs a merge of its own (DOGE, the data-aware and learned methods) is merged once
    and kept there, so a later rung, or the final merge, reads it instead of merging (or learning) again."""

    def __init__(self, config: MergeDataConfig, tasks: Sequence[TaskInputs], pool: Any, cache: ContentCache,
                 options: Mapping[str, Any] | None, device: str | torch.device, merged_dir: Path | None = None):
        self.config, self.tasks, self.pool, self.device = config, list(tasks), pool, device
        self.family = get_family(config.family)
        self.model_dir = model_directory(config, cache, options)
        self.base = {key: pool.base.get(key) for key in pool.base.keys()}
        self.updates: dict[str, dict[str, torch.Tensor]] = {}
        self.merged_dir = merged_dir

    def merged_file(self, method: str, point: Mapping[str, Any]) -> Path | None:
        """Where a point that needs its own merge is kept (None without `merged_dir` or for a rescaled update)."""
        from mergeflow.methods import method_class

        if self.merged_dir is None or method_class(method).scaling_param is not None:
            return None
        return self.merged_dir / kept_merge_name(method, point)

    def accuracy(self, state_dict: Mapping[str, torch.Tensor], examples: int, only: str | None = None
                 ) -> dict[str, float]:
        model = _load(self.config, self.model_dir, state_dict, self.device)
        splits = {t.name: (t.head, self.family.first(t.task.splits["validation"], examples)) for t in self.tasks
                  if only is None or t.name == only}
        return self.family.evaluate(model, splits, self.config)

    def expert_accuracy(self, experts: Sequence[str], cache: ContentCache, options: Mapping[str, Any] | None,
                        examples: int) -> dict[str, float]:
        """Each expert on its own task: the reference of normalized accuracy."""
        return {t.name: self.accuracy(_state_dict(uri, cache, options), examples, t.name)[t.name]
                for uri, t in zip(experts, self.tasks)}

    def merged(self, method: str, point: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        from mergeflow.sweep import merged_point, scaled_update, update_key

        key = json.dumps([method, update_key(method, point)], sort_keys=True)

        def shared_update() -> dict[str, torch.Tensor]:
            if key not in self.updates:
                self.updates[key] = scaled_update(method, point, self.pool)
            return self.updates[key]

        kept = self.merged_file(method, point)
        if kept is not None and kept.exists():
            from safetensors.torch import load_file

            return load_file(str(kept))
        merged = merged_point(method, point, self.base, shared_update, self.pool)
        if kept is not None:
            from mergeflow.checkpoints.safetensors_format import save_safetensors

            save_safetensors({k: v.contiguous() for k, v in merged.items()}, kept)
        return merged

    def score(self, method: str, point: Mapping[str, Any], examples: int) -> dict[str, float]:
        return self.accuracy(self.merged(method, point), examples)


def tune(method: str, params: Mapping[str, Any], grid: Mapping[str, Sequence[Any]], base: str,
         experts: Sequence[str], config: MergeDataConfig, tasks: Sequence[TaskInputs], cache: ContentCache,
         options: Mapping[str, Any] | None = None, *, rule: str = "norm_acc.avg", floor: float = 0.0,
         max_examples: int = 200, device: str | torch.device = "cpu") -> tuple[dict[str, Any], list[Any]]:
    """Score every point of `grid` on each task's validation split (never its test split) and return (chosen
    parameters, all point scores). Scaling-only coefficients are applied to one shared update."""
    from mergeflow.sweep import choose, grid_points, score_point

    points = grid_points(method, grid, params)
    with open_pool(base, {t.name: uri for uri, t in zip(experts, tasks)}, device, options, cache) as pool:
        scorer = ValidationScorer(config, tasks, pool, cache, options, device)
        expert_accuracy = scorer.expert_accuracy(experts, cache, options, max_examples)
        scores = [score_point(point, scorer.score(method, point, max_examples), expert_accuracy, rule, floor)
                  for point in points]
    return choose(scores, list(grid)).params, scores


def search(settings: Any, base: str, experts: Sequence[str], config: MergeDataConfig, tasks: Sequence[TaskInputs],
           cache: ContentCache, options: Mapping[str, Any] | None = None, *, rule: str = "norm_acc.avg",
           floor: float = 0.0, max_examples: int = 200, device: str | torch.device = "cpu",
           progress: bool = False, merged_dir: Path | None = None) -> Any:
    """`--method auto`: successive halving (`mergeflow.search`) over the candidates of `settings` (a
    `SearchConfig`) on each task's validation split; data-aware candidates read statistics of each expert on
    `config.statistics.split`, computed once for every kind they need; learned ones (AdaMerging, DOGE AM, only
    when named) minimise the entropy of the tasks' validation inputs, whatever `unlabeled_split` says. Points that
    need a merge of their own are kept in `merged_dir` (`ValidationScorer`). Returns the `SearchResult`."""
    from mergeflow.config import MergeSpec
    from mergeflow.methods import method_class
    from mergeflow.search import successive_halving
    from mergeflow.stages.statistics import statistic_kinds

    candidates = settings.candidates()
    kinds = statistic_kinds([MergeSpec(method=c.method, params=c.params) for c in candidates])
    statistics = expert_statistics(config, kinds, experts, tasks, cache, options, device, progress) if kinds else None
    with open_pool(base, {t.name: uri for uri, t in zip(experts, tasks)}, device, options, cache,
                   statistics) as pool:
        if any(method_class(c.method).needs_objective for c in candidates):
            pool.objective = build_objective(config.model_copy(update={"unlabeled_split": "validation"}), base,
                                             tasks, cache, options, device)
        scorer = ValidationScorer(config, tasks, pool, cache, options, device, merged_dir)
        def expert_accuracy(examples: int) -> dict[str, float]:  # on the rung's examples, as the candidates
            return scorer.expert_accuracy(experts, cache, options, examples)

        def score_rung(rung: int, examples: int, chosen: Sequence[Any]) -> list[dict[str, float]]:
            out = [scorer.score(c.method, c.params, examples) for c in chosen]
            if progress:
                print(f"  rung {rung}: {len(chosen)} candidates scored on {examples} validation examples per task")
            return out

        return successive_halving(candidates, score_rung, expert_accuracy, min_examples=settings.min_examples,
                                  max_examples=max_examples, eta=settings.eta, rule=rule, floor=floor,
                                  max_evaluations=settings.max_evaluations, max_seconds=settings.max_seconds)
