"""The sweep stage: one grid point of a method scored on validation data, its weights never published. Scaling
methods share one update per setting of their other parameters (theta_0 + lambda U), other points keep their merged
weights, both in the local cache: a search's deeper rung, and the merge of the chosen point, reuse them."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mergeflow.buffers import release_freed_memory
from mergeflow.checkpoints.writer import output_plan, write_file
from mergeflow.config import EvalConfig, MergeSpec, TuningConfig
from mergeflow.stages.evaluate import score_model
from mergeflow.methods import build_method
from mergeflow.stages.refs import (SHARE_MARK, ObjectRef, TaskInputs, family_of, fingerprint, sweep_uri,
                                   task_digests)
from mergeflow.stages.sparsify import read_sparsified
from mergeflow.stages.stage import Context, Located, Node, Stage
from mergeflow.stages.store import Store
from mergeflow.warm_start import WarmStarts

Unlabeled = tuple[TaskInputs, str, EvalConfig]  # a learned method's objective: tasks, split, evaluation settings

_UPDATE_LOCKS: dict[str, threading.Lock] = {}
_UPDATE_LOCKS_GUARD = threading.Lock()


def _cached(path: Path, write: Callable[[Path], Any]) -> Path:
    """The tensors `write(path)` puts at `path` (`mergeflow.checkpoints.writer.write_file`: one at a time, whole or
    not at all) kept in the local cache (an intermediate, never published): computed once, by one thread."""
    with _UPDATE_LOCKS_GUARD:
        lock = _UPDATE_LOCKS.setdefault(str(path), threading.Lock())
    with lock:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write(path)
    return path


def _scaled_update(method: str, params: Mapping[str, Any], base: ObjectRef, experts: Mapping[str, ObjectRef],
                   store: Store, device: str, subspaces: Mapping[str, ObjectRef] | None,
                   state: ObjectRef | None) -> Path:
    """A scaling method's update at lambda 1 (`mergeflow.sweep.scaled_update`), computed once per setting of its
    other parameters and kept in the local cache, written tensor by tensor as it is computed."""
    from mergeflow.sweep import scaled_update, update_plan

    def write(path: Path) -> None:
        with store.expert_pool(base, experts, device, subspaces) as pool:
            pool.warm = warm_starts(method, params, base, experts, store)
            update = scaled_update(method, params, pool, read_sparsified(state, store) if state is not None else None)
            write_file(path, update_plan(pool), lambda writer: [writer.write(*item) for item in update])

    return _cached(_update_path(method, params, base, experts, store), write)


def _merged_weights(method: str, params: Mapping[str, Any], base: ObjectRef, experts: Mapping[str, ObjectRef],
                    store: Store, device: str, subspaces: Mapping[str, ObjectRef] | None, state: ObjectRef | None,
                    statistics: Mapping[str, ObjectRef] | None, unlabeled: Unlabeled | None = None) -> Path:
    """The merged weights of a point whose every coefficient needs its own merge (DOGE's eta, the data-aware
    methods', the learned ones' on the `unlabeled` objective), kept in the local cache, so a search's deeper rung
    scores them without merging again; written tensor by tensor as the merge produces them."""
    import mergeflow.sweep as sweep

    def write(path: Path) -> None:
        with store.expert_pool(base, experts, device, subspaces, statistics) as pool:
            if unlabeled is not None:
                pool.objective = unlabeled_objective(base, *unlabeled, store, device)
            pool.warm = warm_starts(method, params, base, experts, store, statistics, unlabeled)
            sparsified = read_sparsified(state, store) if state is not None else None
            write_file(path, output_plan(pool.infos(), None),
                       lambda writer: sweep.write_point(method, params, pool, writer, sparsified))

    return _cached(_point_path(method, params, base, experts, store, statistics, unlabeled), write)


def unlabeled_objective(base: ObjectRef, tasks: TaskInputs, split: str, evaluation: EvalConfig,
                        store: Store, device: str = "auto"):
    """The entropy objective over each task's unlabeled `split` inputs with its frozen head (labels never read)."""
    splits = {name: (store.load_head(head, base), store.read_task(name, dataset, base, [split]).splits[split])
              for name, (dataset, head) in tasks.items()}
    return family_of(base).objective(store.load_model(base, None, device), splits, evaluation)


def unlabeled_key(unlabeled: Unlabeled) -> list[Any]:
    """What a learned point's objective depends on: each task's data and head digests, the split, the settings."""
    tasks, split, evaluation = unlabeled
    return [task_digests(tasks), split, evaluation.model_dump()]


def warm_starts(method: str, params: Mapping[str, Any], base: ObjectRef, experts: Mapping[str, ObjectRef],
                store: Store, statistics: Mapping[str, ObjectRef] | None = None,
                unlabeled: Unlabeled | None = None) -> WarmStarts | None:
    """Where an iterative method's point keeps and finds its solver states (`mergeflow.warm_start`), in the local
    cache under the method, its parameters but its counts and scaling, and the inputs (a learned method's objective
    among them); a point that runs fewer counts than the method's own (an early rung of `auto`) keeps its end
    states, so the full point continues from them. None for a method that does not iterate."""
    from mergeflow.methods import method_class

    cls = method_class(method)
    if not cls.fidelity:
        return None
    problem = {k: v for k, v in params.items() if k not in cls.fidelity and k != cls.scaling_param}
    fp = fingerprint(method, problem, base.sha256, [e.sha256 for e in experts.values()],
                     *([[r.sha256 for r in statistics.values()]] if statistics else []),
                     *([unlabeled_key(unlabeled)] if unlabeled is not None else []))
    counts, own = cls.counts(params), cls.counts(problem)
    # statistics on a share of the examples (an early rung) pose another problem than the full point's: nothing to keep
    cut = statistics is not None and any(SHARE_MARK in r.uri.rsplit("/", 1)[-1] for r in statistics.values())
    return WarmStarts(store.cache.root / "warm" / f"{method}-{fp}",
                      keep=not cut and any(counts[k] < own[k] for k in counts))


def _update_path(method: str, params: Mapping[str, Any], base: ObjectRef, experts: Mapping[str, ObjectRef],
                 store: Store) -> Path:
    from mergeflow.sweep import update_key

    fp = fingerprint(method, update_key(method, params), base.sha256, [e.sha256 for e in experts.values()])
    return store.cache.root / "updates" / f"{method}-{fp}.safetensors"


def _point_path(method: str, params: Mapping[str, Any], base: ObjectRef, experts: Mapping[str, ObjectRef],
                store: Store, statistics: Mapping[str, ObjectRef] | None, unlabeled: Unlabeled | None = None) -> Path:
    fp = fingerprint(method, dict(params), base.sha256, [e.sha256 for e in experts.values()],
                     *([[r.sha256 for r in statistics.values()]] if statistics else []),
                     *([unlabeled_key(unlabeled)] if unlabeled else []))
    return store.cache.root / "points" / f"{method}-{fp}.safetensors"


def cached_point(method: str, params: Mapping[str, Any], base: ObjectRef, experts: Mapping[str, ObjectRef],
                 store: Store, statistics: Mapping[str, ObjectRef] | None = None,
                 unlabeled: Unlabeled | None = None) -> Mapping[str, Any] | None:
    """The merged tensors of a point a sweep or search already computed, read one tensor at a time (theta_0 +
    lambda U from the base and the cached update, or the cached merged weights), bit-identical to merging it again;
    None when it was never computed here. Close it (`close()`) when done."""
    from mergeflow.methods import method_class

    scaling = method_class(method).scaling_param
    if scaling is None:
        path = _point_path(method, params, base, experts, store, statistics, unlabeled)
        return SafetensorsFile(path, store) if path.exists() else None
    path = _update_path(method, params, base, experts, store)
    return _scaled_point(method, params, base, store, path) if path.exists() else None


class SafetensorsFile(Mapping[str, Any]):
    """A cached point's or update's local safetensors file as a read-only mapping, read one tensor at a time by the
    checkpoint reader (positional reads: a memory map's touched pages would stay in the process's RSS while it is
    open, the whole 4.4 GB fp32 update of a 1 B model). `close()` closes it."""

    def __init__(self, path: Path, store: Store):
        from mergeflow.checkpoints import open_checkpoint

        self._file = open_checkpoint(str(path), cache=store.cache)
        self._keys = self._file.keys()
        self._known = set(self._keys)

    def __getitem__(self, name: str) -> Any:
        if name not in self._known:
            raise KeyError(name)
        return self._file.get(name)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def close(self) -> None:
        self._file.close()


def _scaled_point(method: str, params: Mapping[str, Any], base: ObjectRef, store: Store, update: Path) -> Any:
    """theta_0 + lambda U of a scaling method's point (`mergeflow.sweep.ScaledPoint`) over the base checkpoint and
    the cached update file, both opened here."""
    from mergeflow.checkpoints import open_checkpoint
    from mergeflow.methods import method_class
    from mergeflow.sweep import ScaledPoint

    value = build_method(method, params).params.model_dump()[method_class(method).scaling_param]
    base_ckpt = open_checkpoint(store.base_weights(base), storage_options=store.options, cache=store.cache)
    return ScaledPoint(base_ckpt, SafetensorsFile(update, store), float(value))


def sweep_weights(method: str, params: Mapping[str, Any], base: ObjectRef, experts: Mapping[str, ObjectRef],
                  store: Store, device: str = "auto", subspaces: Mapping[str, ObjectRef] | None = None,
                  state: ObjectRef | None = None, statistics: Mapping[str, ObjectRef] | None = None,
                  unlabeled: Unlabeled | None = None) -> dict[str, Any]:
    """The merged state dict of one grid point, in memory: theta_0 + lambda U built tensor by tensor from the
    update shared through the local cache for scaling methods (never the base, U and the point at once), a full
    merge otherwise (`mergeflow.sweep.write_point`), kept in the cache; both read the sparsify stage's stored global
    pass (`state`) and the subspace stage's factors when given, a data-aware method the experts' `statistics`."""
    from safetensors.torch import load_file

    from mergeflow.methods import method_class

    if method_class(method).scaling_param is None:
        return load_file(str(_merged_weights(method, params, base, experts, store, device, subspaces, state,
                                             statistics, unlabeled)))
    point = _scaled_point(method, params, base, store,
                          _scaled_update(method, params, base, experts, store, device, subspaces, state))
    try:
        return {name: point[name] for name in point}
    finally:
        point.close()
        release_freed_memory()  # the fp32 update's tensors, read one at a time and freed, before the model scores


def point_location(method: str, params: Mapping[str, Any], base: ObjectRef, experts: Mapping[str, ObjectRef],
                   tasks: TaskInputs, tuning: TuningConfig, evaluation: EvalConfig, root: str,
                   statistics: Mapping[str, ObjectRef] | None = None, learn_on: str | None = None) -> str:
    """Where a grid point's validation scores are stored."""
    return sweep_uri(root, method, {**params, **({"learn_on": learn_on} if learn_on else {})}, base, experts, tasks,
                     tuning.max_examples, evaluation.model_dump(), statistics)


def sweep_point(method: str, params: Mapping[str, Any], base: ObjectRef, experts: Mapping[str, ObjectRef],
                tasks: TaskInputs, tuning: TuningConfig, evaluation: EvalConfig, store: Store,
                device: str = "auto", subspaces: Mapping[str, ObjectRef] | None = None,
                state: ObjectRef | None = None, statistics: Mapping[str, ObjectRef] | None = None,
                learn_on: str | None = None, resume_from: int = 0) -> tuple[dict[str, Any], bool]:
    """Validation accuracy per task of one grid point on the first `tuning.max_examples` validation examples of
    each task (weights never published), with each example's credit where the family gives them; the small score
    record is stored under a key of every input digest, the method, its parameters and that count, so a rerun, a
    grown grid or a search's deeper rung scores only what is new. `resume_from`: a smaller count this point may
    already be scored on (a search's earlier rung); where its record holds each example's credit, those are kept
    and only the examples after them are scored (none for a task whose split they already cover). A learned method
    learns on the unlabeled inputs of split `learn_on` (labels never read). Returns ({"accuracy": {task: value},
    "correct": {task: "0110..."}}, reused)."""
    unlabeled = (tasks, learn_on, evaluation) if learn_on else None
    uri = point_location(method, params, base, experts, tasks, tuning, evaluation, store.root, statistics, learn_on)
    if store.exists(uri):
        record = store.read_json(uri)
        return {"accuracy": record["accuracy"], "correct": record.get("correct", {})}, True
    found = _earlier_credits(method, params, base, experts, tasks, tuning, evaluation, store, statistics, learn_on,
                             resume_from)
    rest = {t: v for t, v in tasks.items() if found is None or found[t][1]}  # tasks with examples left to score
    accuracy, correct = {}, {}
    if rest:  # the state dict is handed over: no reference kept here
        accuracy, correct = score_model(base, rest, evaluation, store, device, "validation", tuning.max_examples,
                                        sweep_weights(method, params, base, experts, store, device, subspaces, state,
                                                      statistics, unlabeled), 0 if found is None else resume_from)
    if found is not None:  # the earlier examples' credits, then the new ones'
        correct = {t: found[t][0] + correct.get(t, "") for t in tasks}
        accuracy = {t: family_of(base).metric_of([int(c) for c in correct[t]]) for t in tasks}
    store.publish_json(uri, {"method": method, "params": dict(params), "split": "validation", "accuracy": accuracy,
                             "correct": correct, **({} if found is None else {"continued_from": resume_from})})
    return {"accuracy": accuracy, "correct": correct}, False


def _earlier_credits(method: str, params: Mapping[str, Any], base: ObjectRef, experts: Mapping[str, ObjectRef],
                     tasks: TaskInputs, tuning: TuningConfig, evaluation: EvalConfig, store: Store,
                     statistics: Mapping[str, ObjectRef] | None, learn_on: str | None, count: int
                     ) -> dict[str, tuple[str, bool]] | None:
    """Per task (its credits in this point's stored record on the first `count` examples, whether its split holds
    more examples), where that record exists and holds each task's credit of every example it covers; else None."""
    from mergeflow.stages.evaluate import split_sizes

    if count <= 0 or (tuning.max_examples is not None and count >= tuning.max_examples):
        return None
    earlier = tuning.model_copy(update={"max_examples": count})
    uri = point_location(method, params, base, experts, tasks, earlier, evaluation, store.root, statistics, learn_on)
    if not store.exists(uri):
        return None
    correct, sizes = store.read_json(uri).get("correct") or {}, split_sizes(base, tasks, store, "validation")
    if not all(len(correct.get(t, "")) == min(sizes[t], count) for t in tasks):
        return None  # no credits (a score that is not their mean), or another record
    return {t: (correct[t], sizes[t] > count) for t in tasks}


# ---------------------------------------------------------------------------------------- the plan's stages

def _learns(spec: MergeSpec) -> bool:
    from mergeflow.methods import method_class

    return method_class(spec.method).needs_objective


def _point_reads(spec: MergeSpec, examples: int, ctx: Context, share: float = 1.0
                 ) -> tuple[TuningConfig, dict[str, ObjectRef] | None, str | None]:
    """(tuning at `examples`, statistics, split learned on) of a point: a data-aware method reads the experts'
    statistics (on `share` of their examples), a learned one learns on the inputs of validation (never its
    labels)."""
    from mergeflow.stages import statistics

    tuning = ctx.config.tuning.model_copy(update={"max_examples": examples})
    return tuning, statistics.read_by(spec, ctx, share), "validation" if _learns(spec) else None


def _point_where(node: Node, ctx: Context) -> Located:
    tuning, statistics, learn_on = _point_reads(node.spec, node.examples, ctx, node.share or 1.0)
    uri = point_location(node.spec.method, node.spec.params, ctx.base, ctx.experts, ctx.tasks, tuning,
                         ctx.config.evaluation, ctx.store.root, statistics, learn_on)
    return uri, lambda: ObjectRef(uri=uri, sha256="")


def score(spec: MergeSpec, examples: int, ctx: Context, share: float = 1.0, resume_from: int = 0) -> dict[str, Any]:
    """One point's validation accuracy per task on its first `examples` per task, with each example's credit (the
    sweep-point stage of a grid point or a search's candidate; `share`: of the statistics' examples it reads;
    `resume_from`: the count it may already be scored on, `sweep_point`'s)."""
    from mergeflow.stages import sparsify, subspace

    tuning, statistics, learn_on = _point_reads(spec, examples, ctx, share)
    return sweep_point(spec.method, spec.params, ctx.base, ctx.experts, ctx.tasks, tuning, ctx.config.evaluation,
                       ctx.store, ctx.device, subspace.read_by(spec, ctx), sparsify.pass_of(spec, ctx), statistics,
                       learn_on, resume_from)[0]


def _sweep_point(node: Node, ctx: Context) -> dict[str, Any]:
    return score(node.spec, node.examples, ctx, node.share or 1.0)


def choose_point(node: Node, ctx: Context, accuracies: Mapping[str, Mapping[str, float]],
                 expert_scores: Mapping[str, float]) -> tuple[MergeSpec, list[Any]]:
    """The grid point of a `select:<label>` node chosen by the run's rule from its points' validation accuracies
    (by point node id); returns (its spec, every point's score)."""
    from mergeflow.sweep import choose, score_point

    spec = ctx.labelled[node.id.removeprefix("select:")]
    tuning = ctx.config.tuning
    points = [ctx.plan.node(i) for i in node.inputs if i.startswith("sweep:")]
    scores = [score_point(p.spec.params, accuracies[p.id], expert_scores, tuning.rule, tuning.floor) for p in points]
    return MergeSpec(method=spec.method, params=choose(scores, list(spec.grid())).params), scores


def _select_point(node: Node, ctx: Context) -> MergeSpec:
    from mergeflow.hygiene import held_out_accuracy, held_out_note

    leaked = ctx.leaked()
    if note := held_out_note(ctx.held_out(), ctx.config.tuning.max_examples):
        print(f"  {note}")
    accuracies = {i: held_out_accuracy(ctx.value(i), leaked) for i in node.inputs if i.startswith("sweep:")}
    chosen, scores = choose_point(node, ctx, accuracies, ctx.expert_scores())
    for point in scores:
        shown = {k: point.params[k] for k in ctx.labelled[node.id.removeprefix("select:")].grid()}
        print(f"  {json.dumps(shown)}: validation avg {100 * point.avg:.1f}%, norm. avg {100 * point.norm_avg:.1f}%"
              + ("  <- chosen" if point.params == chosen.params else ""))
    return chosen


STAGES = (Stage("sweep_point", _point_where, _sweep_point), Stage("select_point", None, _select_point))
