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
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mergeflow.config import (DataConfig, EvalConfig, MergeDataConfig, MergeSpec, ModelConfig, RunConfig,
                              StorageConfig, TaskConfig)
from mergeflow.errors import ConfigError, MergeflowError
from mergeflow.families import get_family
from mergeflow.plan import Plan, compile_plan
from mergeflow.stages.data import fit_head, prepare_dataset
from mergeflow.stages.merge import engine_inputs, merge_reads
from mergeflow.stages.refs import ModelRef, fingerprint
from mergeflow.stages.stage import Context
from mergeflow.stages.store import Store
from mergeflow.storage import directory_digest, join


def evaluation_settings(config: MergeDataConfig) -> EvalConfig:
    """The flow's evaluation settings of a data config (equal settings share stored scores with a flow run)."""
    return EvalConfig(batch_size=config.batch_size, max_length=config.max_length)


def upstream(plan: Plan, ids: Iterable[str]) -> set[str]:
    """`ids` and every node they read, directly or through others."""
    inputs = {node.id: node.inputs for node in plan}
    found, todo = set(), list(ids)
    while todo:
        id = todo.pop()
        if id not in found:
            found.add(id)
            todo.extend(inputs[id])
    return found


class InProcessRun(Context):
    """A plan run in this process over a local `Store`: each node's stage `run`, in the plan's order, at most once
    (outputs already known, such as the command line's checked inputs, are not run again)."""

    def walk(self, ids: Iterable[str]) -> None:
        """Run the nodes `ids` need and then `ids` (a search's rungs run inside its `record_search` node)."""
        needed = upstream(self.plan, ids)
        for node in self.plan:
            if node.id not in needed or node.id in self.outputs or node.part_of is not None:
                continue
            if node.stage.run is None:
                raise MergeflowError(f"plan node {node.id}: stage {node.kind} runs only in the flow")
            self.outputs[node.id] = node.stage.run(node, self)

    def value(self, id: str) -> Any:
        if id not in self.outputs and (node := self.on_demand(id)) is not None:
            self.outputs[id] = node.stage.run(node, self)
        return super().value(id)

    @property
    def label(self) -> str:
        return self.config.merge_labels()[0]

    def merge_inputs(self) -> dict[str, Any]:
        """`merge_checkpoints` keywords for the run's merge as the flow's merge stage reads them (its stored pass,
        statistics, subspaces, objective, and the point a sweep or search computed: written, not merged again),
        after every node the merge reads has run."""
        node = self.plan.node(f"merge:{self.label}")
        self.walk(node.inputs)
        reads = merge_reads(self.label, node, self)
        return engine_inputs(reads.pop("spec"), self.base, self.experts, self.store, device=self.device, **reads)

    # for callers scoring points outside a plan's walk (benchmarks/auto_regret.py)

    @property
    def evaluation(self) -> EvalConfig:
        return self.config.evaluation

    def score(self, spec: MergeSpec, examples: int, share: float = 1.0) -> dict[str, Any]:
        from mergeflow.stages.sweep import score

        return score(spec, examples, self, share)


def run_config(config: MergeDataConfig, base: ModelRef, experts: Sequence[str], store: Store,
               merge: MergeSpec) -> RunConfig:
    """The run config of a command-line merge: the data config's tasks with the `--expert`s, its evaluation,
    statistics and tuning settings, one merge, stored in `store` (equal settings: the flow's keys)."""
    return RunConfig(name="command-line", model=ModelConfig(family=config.family, pretrained=base.uri),
                     tasks=[TaskConfig(name=t.name, expert=uri, dataset=t.dataset, head=t.head)
                            for t, uri in zip(config.tasks, experts)],
                     evaluation=evaluation_settings(config), merges=[merge], tuning=config.tuning,
                     statistics=config.statistics.model_copy(update={"unlabeled_split": config.unlabeled_split}),
                     storage=StorageConfig(root=store.root), device="cpu")


def open_run(config: MergeDataConfig, base: str, experts: Sequence[str], store: Store, merge: MergeSpec,
             device: str = "auto") -> InProcessRun:
    """The plan of a command-line merge over `store`, its inputs checked before any model runs (count, model
    directory, each dataset's layout, each head against its task's classes, each checkpoint's format; errors name
    the data config's field) and given to the plan as its first nodes' outputs."""
    if len(config.tasks) != len(experts):
        raise ConfigError(f"data config lists {len(config.tasks)} tasks for {len(experts)} experts (one per "
                          "--expert, in the same order)")
    model = base_model(config, base, store)
    evaluation, outputs = evaluation_settings(config), {"pretrained": model}
    for i, entry in enumerate(config.tasks):
        dataset = prepare_dataset(entry.name, DataConfig(), store, entry.dataset, config.family,
                                  field=f"tasks.{i}.dataset")
        outputs[f"dataset:{entry.name}"] = dataset
        outputs[f"head:{entry.name}"] = fit_head(entry.name, model, dataset, evaluation, store, device, entry.head,
                                                 field=f"tasks.{i}.head")
    for entry, uri in zip(config.tasks, experts):
        outputs[f"expert:{entry.name}"] = store.checkpoint_ref(uri)
    run = run_config(config, model, experts, store, merge)
    return InProcessRun(run, store, device, compile_plan(run), outputs)


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
