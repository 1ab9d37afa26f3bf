"""The command line's executor of the stages: `mergeflow merge --tune`, `--data` and `--method auto` run the merge
flow's own stages (`mergeflow.stages`) in process, over a `Store` (by default the flow's default store and the
local content cache), so each result lands where the flow keeps it, under the same key: the experts' statistics,
the sparsify passes, the subspaces, every grid point's and search rung's validation scores, the experts'
validation scores, the shared updates and merged points. A command-line run after a flow run on the same inputs
(or the reverse) computes none of what the other stored.

The inputs are the command line's: `--base` (weights), `--expert`s, and a data config (`MergeDataConfig`) naming
the model directory and each task's dataset and head. They become the flow's references: the model directory is
the base when its `model.safetensors` is `--base` (else the two are stored once as one directory), the experts
are referenced where they are, and the data config's `batch_size` and `max_length` are the evaluation settings.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergeflow.config import DataConfig, EvalConfig, MergeDataConfig, MergeSpec, SearchConfig, TuningConfig
from mergeflow.errors import ConfigError
from mergeflow.families import get_family
from mergeflow.plan import pass_key
from mergeflow.stages import statistics as statistics_stage, subspace as subspace_stage
from mergeflow.stages.data import fit_head, prepare_dataset
from mergeflow.stages.evaluate import evaluate_stored
from mergeflow.stages.merge import needs_objective
from mergeflow.stages.refs import ModelRef, ObjectRef, fingerprint
from mergeflow.stages.sparsify import read_sparsified, sparsify
from mergeflow.stages.store import Store
from mergeflow.stages.sweep import cached_point, sweep_point, unlabeled_objective
from mergeflow.storage import directory_digest, join


def evaluation_settings(config: MergeDataConfig) -> EvalConfig:
    """The flow's evaluation settings of a data config (equal settings share stored scores with a flow run)."""
    return EvalConfig(batch_size=config.batch_size, max_length=config.max_length)


@dataclass
class InProcessRun:
    """The stages of one command-line merge over `store`: inputs as references, each stage run at most once."""

    config: MergeDataConfig
    store: Store
    base: ModelRef
    experts: dict[str, ObjectRef]
    tasks: dict[str, tuple[ObjectRef, ObjectRef]]
    device: str = "auto"
    kinds: tuple[str, ...] | None = None  # statistics kinds a search computes for all its data-aware candidates
    _statistics: dict[tuple[str, ...], dict[str, ObjectRef]] = field(default_factory=dict)
    _subspaces: dict[str, ObjectRef] = field(default_factory=dict)
    _passes: dict[str, ObjectRef] = field(default_factory=dict)

    @property
    def evaluation(self) -> EvalConfig:
        return evaluation_settings(self.config)

    # ------------------------------------------------------------------------------------------ the stages

    def statistics(self, spec: MergeSpec) -> dict[str, ObjectRef] | None:
        """Each expert's statistics of the kinds `spec` reads, or within a search of every kind its candidates read,
        as the flow computes them (stored beside the expert; None: it reads none)."""
        kinds = statistics_stage.statistic_kinds([spec])
        if not kinds:
            return None
        kinds = self.kinds or kinds
        if kinds not in self._statistics:
            found = {}
            for name, expert in self.experts.items():
                dataset, head = self.tasks[name]
                found[name], report = statistics_stage.compute_statistics(
                    name, self.base, expert, dataset, head, kinds, self.config.statistics, self.store, self.device)
                print(f"statistics {name}: " + ("stored" if report["reused"] else
                                                f"{report['examples']} examples, {report['seconds']} s"))
            self._statistics[kinds] = found
        return self._statistics[kinds]

    def subspaces(self, spec: MergeSpec) -> dict[str, ObjectRef] | None:
        """The stored factors `spec` reads, built once per kind (None: it reads none)."""
        kinds = subspace_stage.subspace_kinds([spec])
        for kind in kinds:
            if kind not in self._subspaces:
                self._subspaces[kind], _, _ = subspace_stage.build_subspace(kind, self.base, self.experts,
                                                                            self.store, self.device)
        return {kind: self._subspaces[kind] for kind in kinds} or None

    def sparsify_pass(self, spec: MergeSpec) -> ObjectRef | None:
        """The stored global pass `spec` reads (the flow's sparsify stage, run once per pass; None: none)."""
        key = pass_key(spec)
        if key is None:
            return None
        if key not in self._passes:
            self._passes[key] = sparsify(spec, self.base, self.experts, self.store, self.device)[0]
        return self._passes[key]

    def expert_validation(self, examples: int) -> dict[str, float]:
        """Each expert's accuracy on the first `examples` validation examples of its own task (stored scores)."""
        return {name: evaluate_stored(expert, self.base, {name: self.tasks[name]}, self.evaluation, self.store,
                                      self.device, "validation", examples)[0][name]
                for name, expert in self.experts.items()}

    def score(self, spec: MergeSpec, examples: int) -> dict[str, Any]:
        """One point's validation accuracy per task on `examples` per task, with each example's credit (the flow's
        sweep-point stage; a learned method learns on the validation inputs, never their labels)."""
        tuning = TuningConfig(max_examples=examples)
        result, _ = sweep_point(spec.method, spec.params, self.base, self.experts, self.tasks, tuning,
                                  self.evaluation, self.store, self.device, self.subspaces(spec),
                                  self.sparsify_pass(spec), self.statistics(spec),
                                "validation" if needs_objective(spec) else None)
        return result

    def warn_overlap(self) -> dict[str, dict[str, int]]:
        """Each task's validation examples also in its train split (by input content), with a warning printed
        naming the tasks where any are: choices made on them are biased."""
        from mergeflow.hygiene import overlap_warning
        from mergeflow.stages.data import validation_overlap

        found = {name: validation_overlap(name, dataset, self.base, self.store)
                 for name, (dataset, _) in self.tasks.items()}
        if warning := overlap_warning(found):
            print(warning)
        return found

    # ------------------------------------------------------------------------------------------ the choices

    def tune(self, method: str, params: Mapping[str, Any], grid: Mapping[str, Sequence[Any]],
             tuning: TuningConfig) -> tuple[dict[str, Any], list[Any]]:
        """Every grid point scored on validation (never test); returns (chosen parameters, every point's score)."""
        from mergeflow.sweep import choose, grid_points, score_point

        points = grid_points(method, grid, params)
        expert_accuracy = self.expert_validation(tuning.max_examples)
        scores = [score_point(point, self.score(MergeSpec(method=method, params=point),
                                                tuning.max_examples)["accuracy"], expert_accuracy, tuning.rule,
                              tuning.floor) for point in points]
        return choose(scores, list(grid)).params, scores

    def search(self, settings: SearchConfig, tuning: TuningConfig) -> Any:
        """`auto`: successive halving (`mergeflow.search`) over `settings`' candidates, each rung's points scored
        as the flow's search scores them; returns the `SearchResult`."""
        from mergeflow.search import successive_halving

        candidates = settings.candidates()
        self.kinds = statistics_stage.statistic_kinds([MergeSpec(method=c.method, params=c.params)
                                                       for c in candidates]) or None

        def score_rung(rung: int, examples: int, chosen: Sequence[Any]) -> list[dict[str, Any]]:
            out = [self.score(MergeSpec(method=c.method, params=c.params), examples) for c in chosen]
            print(f"  rung {rung}: {len(chosen)} candidates scored on {examples} validation examples per task")
            return out

        return successive_halving(candidates, score_rung, self.expert_validation(tuning.max_examples),
                                  min_examples=settings.min_examples, max_examples=tuning.max_examples,
                                  eta=settings.eta, rule=tuning.rule, floor=tuning.floor,
                                  max_evaluations=settings.max_evaluations, max_seconds=settings.max_seconds,
                                  confidence=settings.confidence, extend_edges=settings.extend_edges,
                                  fidelity=settings.fidelity)

    # ------------------------------------------------------------------------------------------ the merge

    def merge_inputs(self, spec: MergeSpec, tuned: bool = False, with_statistics: bool = True) -> dict[str, Any]:
        """`merge_checkpoints` keywords for merging `spec` as the flow's merge stage does: its stored pass,
        subspaces and (`with_statistics`) statistics, and the point a sweep or search computed (written, not merged
        again) or, for a learned method, the objective on the inputs of the data config's `unlabeled_split`
        (`tuned`: of the validation split, on which it was scored)."""
        from mergeflow.stages.subspace import stored_subspaces

        statistics = self.statistics(spec) if with_statistics else None
        subspaces, state = self.subspaces(spec), self.sparsify_pass(spec)
        split = "validation" if tuned else self.config.unlabeled_split
        unlabeled = (self.tasks, split, self.evaluation) if needs_objective(spec) else None
        precomputed = cached_point(spec.method, spec.params, self.base, self.experts, self.store, statistics,
                                   unlabeled)
        objective = (unlabeled_objective(self.base, *unlabeled, self.store, self.device)
                     if unlabeled and precomputed is None else None)
        return {"state": read_sparsified(state, self.store) if state is not None else None,
                "statistics": [statistics[n].uri for n in self.experts] if statistics else None,
                "subspaces": stored_subspaces(subspaces, self.store) or None, "objective": objective,
                "precomputed": precomputed}


def open_run(config: MergeDataConfig, base: str, experts: Sequence[str], store: Store,
             device: str = "auto") -> InProcessRun:
    """The command line's inputs as the stages' references, checked before any model runs (count, model
    directory, each dataset's layout, each head against its task's classes, each checkpoint's format); errors name
    the data config's field."""
    if len(config.tasks) != len(experts):
        raise ConfigError(f"data config lists {len(config.tasks)} tasks for {len(experts)} experts (one per "
                          "--expert, in the same order)")
    model = base_model(config, base, store)
    evaluation, tasks = evaluation_settings(config), {}
    for i, entry in enumerate(config.tasks):
        dataset = prepare_dataset(entry.name, DataConfig(), store, entry.dataset, config.family,
                                  field=f"tasks.{i}.dataset")
        head = fit_head(entry.name, model, dataset, evaluation, store, device, entry.head, field=f"tasks.{i}.head")
        tasks[entry.name] = (dataset, head)
    refs = {entry.name: store.checkpoint_ref(uri) for entry, uri in zip(config.tasks, experts)}
    return InProcessRun(config, store, model, refs, tasks, device)


def base_model(config: MergeDataConfig, base: str, store: Store) -> ModelRef:
    """The pretrained model as the flow references it: the data config's model directory when its weights
    (`model.safetensors`, or its sharded index and shards) are `--base`; else the directory's files with `--base`'s
    weights, stored once (under `base/composed-<fingerprint>/`)."""
    from mergeflow.checkpoints import open_checkpoint
    from mergeflow.checkpoints.reader import SAFETENSORS_INDEX

    family = get_family(config.family)
    path, files = store.input_directory(config.model, "model")
    family.check_model_dir(path, f"model ({config.model})", weights=False)
    with open_checkpoint(base, storage_options=store.options, cache=store.cache) as ckpt:
        weights = ckpt.digest
        given = ModelRef(uri=config.model, sha256=directory_digest(files), family=config.family)
        if files.get("model.safetensors") == weights or (
                SAFETENSORS_INDEX in files and store.base_checkpoint(given)[1] == weights):
            return given
        uri = join(store.root, "base", f"composed-{fingerprint(directory_digest(files), weights)}")

        def build(staged: Path) -> None:
            from mergeflow.checkpoints.safetensors_format import save_safetensors

            for name in files:
                if not name.endswith((".safetensors", ".bin", ".pt", ".pth")):
                    (staged / name).write_bytes((path / name).read_bytes())
            save_safetensors({key: ckpt.get(key).contiguous() for key in ckpt.keys()}, staged / "model.safetensors")
            (staged / "mergeflow-base.json").write_text(json.dumps({"model": config.model, "weights": base}))

        ref = store.publish_or_reuse(build, uri)
    return ModelRef(uri=ref.uri, sha256=ref.sha256, family=config.family)
