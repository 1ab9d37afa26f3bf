"""The evaluation stage: each task's primary metric under its frozen head, for a stored model (scores kept and
reused while the model, data, heads and settings are unchanged) or an in-memory state dict."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mergeflow.config import EvalConfig
from mergeflow.stages.refs import ObjectRef, TaskInputs, evaluation_uri, family_of
from mergeflow.stages.stage import Context, Located, Node, Stage
from mergeflow.stages.store import Store


def evaluate_model(weights: ObjectRef | None, base: ObjectRef, tasks: TaskInputs, evaluation: EvalConfig,
                   store: Store, device: str = "auto", split: str = "test", max_examples: int | None = None,
                   state_dict: Mapping[str, Any] | None = None) -> dict[str, float]:
    """The primary metric (accuracy for classification) on each task's `split` (only that split is read; at most
    `max_examples` per task) with that task's frozen head; `weights=None` scores the pretrained model, or the
    in-memory `state_dict` when given. `tasks` maps task name to (dataset, head)."""
    model = store.load_model(base, weights, device, state_dict)
    return family_of(base).evaluate(model, _splits(base, tasks, store, split, max_examples), evaluation)


def _splits(base: ObjectRef, tasks: TaskInputs, store: Store, split: str, max_examples: int | None, start: int = 0
            ) -> dict[str, tuple[Any, Any]]:
    """Each task's head and `split` (its first `max_examples`, less the first `start`), as a family scores them."""
    family, out = family_of(base), {}
    for name, (dataset, head) in tasks.items():
        data = store.read_task(name, dataset, base, [split]).splits[split]
        if max_examples is not None or start:
            data = family.first(data, family.split_size(data) if max_examples is None else max_examples, start)
        out[name] = (store.load_head(head, base), data)
    return out


def split_sizes(base: ObjectRef, tasks: TaskInputs, store: Store, split: str) -> dict[str, int]:
    """Each task's number of examples in `split`."""
    family = family_of(base)
    return {name: family.split_size(store.read_task(name, dataset, base, [split]).splits[split])
            for name, (dataset, _) in tasks.items()}


def score_model(base: ObjectRef, tasks: TaskInputs, evaluation: EvalConfig, store: Store, device: str,
                split: str, max_examples: int | None, state_dict: Mapping[str, Any], start: int = 0
                ) -> tuple[dict[str, float], dict[str, str]]:
    """`evaluate_model` of an in-memory state dict, with each example's credit per task where the family gives
    them ("0110...": what a search compares candidates on, example by example), on the first `max_examples` of
    `split` less the first `start`. The dict is taken over: once the model holds its tensors it is released, so a
    cast for scoring (bf16 to fp32 on a CPU) frees them as it goes, where the caller keeps no reference (a 1 B
    sweep point: 2.2 GB less at its peak)."""
    model = store.load_model(base, None, device, state_dict)
    del state_dict
    scores = family_of(base).score_examples(model, _splits(base, tasks, store, split, max_examples, start),
                                            evaluation)
    return ({name: value for name, (value, _) in scores.items()},
            {name: "".join(map(str, credits)) for name, (_, credits) in scores.items() if credits is not None})


def evaluation_location(weights: ObjectRef | None, base: ObjectRef, tasks: TaskInputs, evaluation: EvalConfig,
                        root: str, split: str = "test", max_examples: int | None = None) -> str:
    """Where the scores of a stored model (`weights`; None: the pretrained one) on `split` are kept."""
    return evaluation_uri(root, weights or base, weights is None, tasks, evaluation.model_dump(), split, max_examples)


def evaluate_stored(weights: ObjectRef | None, base: ObjectRef, tasks: TaskInputs, evaluation: EvalConfig,
                    store: Store, device: str = "auto", split: str = "test",
                    max_examples: int | None = None) -> tuple[dict[str, float], bool]:
    """`evaluate_model` of a stored model, with its scores kept under a key of the model's, every dataset's and
    head's digests and the settings (`evaluations/<fp>.json`), so an unchanged model is never scored twice.
    Returns (accuracy, reused)."""
    model = weights or base
    uri = evaluation_location(weights, base, tasks, evaluation, store.root, split, max_examples)
    if store.exists(uri):
        return store.read_json(uri)["accuracy"], True
    accuracy = evaluate_model(weights, base, tasks, evaluation, store, device, split, max_examples)
    store.publish_json(uri, {"model": model.model_dump(), "split": split, "max_examples": max_examples,
                             "accuracy": accuracy})
    return accuracy, False


# ---------------------------------------------------------------------------------------- the plan's stages

def _reads(node: Node, ctx: Context) -> tuple[ObjectRef | None, TaskInputs]:
    """(the model scored: None for the pretrained one; the tasks it is scored on)."""
    weights = ctx.model_ref(node.model) if node.model else None
    return weights, ctx.tasks if node.task is None else {node.task: ctx.tasks[node.task]}


def _where(node: Node, ctx: Context) -> Located:
    weights, tasks = _reads(node, ctx)
    uri = evaluation_location(weights, ctx.base, tasks, ctx.config.evaluation, ctx.store.root, node.split or "test",
                              node.examples)
    return uri, lambda: ObjectRef(uri=uri, sha256="")


def _evaluate(node: Node, ctx: Context) -> dict[str, float]:
    weights, tasks = _reads(node, ctx)
    return evaluate_stored(weights, ctx.base, tasks, ctx.config.evaluation, ctx.store, ctx.device,
                           node.split or "test", node.examples)[0]


STAGES = (Stage("evaluate", _where, _evaluate),)
