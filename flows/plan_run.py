"""The merge flow's executor of a plan: walks the nodes `compile_plan` made, in order, and submits each as its
Prefect task: the kind's own task where it has one (a method named after the kind: the tasks that record more in
MLflow), else the generic stage task (`tasks/stage.py`) around the stage's library `run`. Which merges sparsify,
read statistics or subspaces, learn on data, sweep, search or run in parts is decided once, in the plan; here each
node only finds its inputs' futures (or values) and calls its task.

Three kinds of node are not walked: a search's rungs and its opening (`Node.part_of`), which the search runs itself
once the rung sizes and survivors are known (the plan estimates them), and the sparsify passes and statistics only a
search reads, submitted the first time a scored candidate (or the merge of a data-aware winner) reads them.
"""

from typing import Any

from prefect import runtime
from prefect.futures import PrefectFuture

from mergeflow.config import MergeSpec, RunConfig
from mergeflow.evaluate import format_results_table
from mergeflow.hygiene import held_out_accuracy, held_out_note
from mergeflow.plan import Node, Plan, pass_key, sparsifies
from mergeflow.stages import merge as merge_stage, statistics as statistics_stage, subspace as subspace_stage
from mergeflow.stages.refs import ObjectRef, run_inputs_digest
from mergeflow.stages.stage import Context
from flows.selection import search
from tasks.artifacts import publish_artifacts
from tasks.evaluate import evaluate
from tasks.fetch import fetch_expert, fetch_latest_expert, fetch_pretrained, prepare_dataset
from tasks.finetune import finetune_expert, fit_head
from tasks.hygiene import check_overlap
from tasks.merge import assemble_merge, build_subspace, merge, merge_part, sparsify
from tasks.progress import CLOCK
from tasks.record import check_unchanged, mark_success, record_merge, record_results, register_best
from tasks.stage import run_stage
from tasks.statistics import compute_statistics
from tasks.sweep import select_point, sweep_point


class PlanRun(Context):
    """One run of the merge flow: `run()` walks the plan and returns the flow's summary. Outputs are Prefect
    futures or values (`value` waits for a future)."""

    def __init__(self, config: RunConfig, parent: str, plan: Plan):
        super().__init__(config, None, config.device, plan)  # each task builds its own store (its credentials)
        self.parent = parent
        self.storage, self.tracking = config.storage, config.tracking
        self.label_passes: dict[str, Any] = {}  # merge label -> the future of its own sparsify stage (or None)
        self.summary: dict[str, Any] = {}

    def run(self) -> dict[str, Any]:
        CLOCK.plan(self.plan.counts())  # the stages of the plan `mergeflow plan` prints
        for node in self.plan:
            if node.part_of is not None:
                continue
            submit = getattr(self, node.kind, None) or self.run_stage
            self.outputs[node.id] = submit(node)
            if node.kind == "check_unchanged" and self.outputs[node.id]:
                return {"run": self.config.name, "skipped": True, "mlflow_run_id": self.parent,
                        "same_as": self.outputs[node.id],
                        "experts": {n: e.model_dump() for n, e in self.experts.items()}}
        return self.summary

    def run_stage(self, node: Node):
        """A stage without a task of its own: its library `run` in the generic stage task, named after its kind,
        with the outputs of what it reads (its inputs, and the run's inputs every stage may read)."""
        sources = ["pretrained", *(f"{kind}:{n}" for n in self.task_configs for kind in ("expert", "dataset", "head"))]
        reads = {i: self.outputs[i] for i in dict.fromkeys([*sources, *node.inputs]) if i in self.outputs}
        return run_stage.with_options(name=node.kind).submit(node, self.config, reads, self.parent)

    def value(self, id: str) -> Any:
        if id not in self.outputs and (node := self.on_demand(id)) is not None:
            self.outputs[id] = getattr(self, node.kind)(node)  # statistics only a search reads: submitted now
        return _value(super().value(id))

    def digest(self) -> str:
        return run_inputs_digest(self.config.model_dump(mode="json"), self.base, self.experts, self.tasks)

    def statistics(self, spec: MergeSpec, share: float = 1.0) -> dict[str, ObjectRef] | None:
        return statistics_stage.read_by(spec, self, share)

    def subspaces(self, spec: MergeSpec) -> dict[str, Any] | None:
        return {kind: self.outputs[f"subspace:{kind}"] for kind in subspace_stage.subspace_kinds([spec])} or None

    def pass_of(self, spec: MergeSpec) -> Any:
        """The future of the sparsify stage a grid point or candidate reads (None: it has none), submitted once."""
        key = pass_key(spec)
        if key is None:
            return None
        if key not in self.passes:
            self.passes[key] = sparsify.submit(spec, self.base, self.experts, self.storage, self.device,
                                               self.tracking, self.parent)
        return self.passes[key]

    # one method per node kind

    def fetch_pretrained(self, node: Node) -> ObjectRef:
        return fetch_pretrained(self.config.model, self.storage)

    def prepare_dataset(self, node: Node):
        return prepare_dataset.submit(node.task, self.config.data, self.storage, self.task_configs[node.task].dataset,
                                      self.config.model.family)

    def fit_head(self, node: Node):
        return fit_head.submit(node.task, self.base, self.outputs[f"dataset:{node.task}"], self.config.evaluation,
                               self.storage, self.device, self.task_configs[node.task].head)

    def fetch_expert(self, node: Node):
        return fetch_expert.submit(node.task, self.task_configs[node.task].expert, self.storage)

    def fetch_latest_expert(self, node: Node):
        return fetch_latest_expert.submit(node.task, self.task_configs[node.task].latest, self.storage)

    def finetune_expert(self, node: Node):
        n = node.task
        return finetune_expert.submit(n, self.base, self.outputs[f"dataset:{n}"], self.outputs[f"head:{n}"],
                                      self.config.finetune, self.storage, self.device, self.tracking, self.parent)

    def check_unchanged(self, node: Node) -> dict[str, Any] | None:
        return check_unchanged(self.config.name, self.digest(), self.storage, self.tracking, self.parent)

    def compute_statistics(self, node: Node):
        n, eval_inputs = node.task, self.tasks
        named = compute_statistics.with_options(task_run_name=node.id.replace(":", "-"))  # "statistics-<task>@0.1"
        return named.submit(n, self.base, self.value(f"expert:{n}"), *eval_inputs[n],
                            statistics_stage.statistic_kinds(self.config.merges), self.config.statistics,
                            self.storage, self.device, self.tracking, self.parent, node.share or 1.0)

    def build_subspace(self, node: Node):
        kind = node.id.split(":", 1)[1]
        return build_subspace.submit(kind, self.base, self.experts, self.storage, self.device, self.tracking,
                                     self.parent)

    def check_overlap(self, node: Node):
        return check_overlap.submit(self.base, self.tasks, self.storage, self.tracking, self.parent)

    def sparsify(self, node: Node):
        if node.id.removeprefix("sparsify:") in self.labelled:  # a merge's own pass: of the point it merges
            return self.label_pass(node.id.removeprefix("sparsify:"))
        return self.pass_of(node.spec)

    def label_pass(self, label: str):
        if label not in self.label_passes:
            spec = self.spec_of(label)
            if sparsifies(spec):
                self.label_passes[label] = sparsify.submit(spec, self.base, self.experts, self.storage, self.device,
                                                           self.tracking, self.parent)
            else:
                self.label_passes[label] = None
                print(f"sparsify: skipped for {label} ({spec.method} has no separate global pass)")
        return self.label_passes[label]

    def sweep_point(self, node: Node):
        label, index = node.id.removeprefix("sweep:").rsplit(":", 1)
        spec = node.spec
        learn_on = "validation" if merge_stage.needs_objective(spec) else None  # inputs only, never labels
        return sweep_point.submit(label, int(index), spec.method, spec.params, self.base, self.experts,
                                  self.tasks, self.config.tuning, self.config.evaluation, self.storage,
                                  self.device, self.tracking, self.parent, self.subspaces(spec), self.pass_of(spec),
                                  self.statistics(spec), None, learn_on)

    def select_point(self, node: Node) -> MergeSpec:
        label = node.id.removeprefix("select:")
        spec = self.labelled[label]
        points = [self.plan.node(i) for i in node.inputs if i.startswith("sweep:")]
        leaked = self.leaked()  # each point read on the validation examples the experts did not train on
        if note := held_out_note(self.held_out(), self.config.tuning.max_examples):
            print(f"select {label}: {note}")
        accuracies = [held_out_accuracy(self.value(point.id), leaked) for point in points]
        params = select_point(label, spec, [point.spec.params for point in points], accuracies,
                              self.expert_scores(), self.config.tuning, self.tracking, self.parent)
        return MergeSpec(method=spec.method, params=params)

    def record_search(self, node: Node) -> MergeSpec:
        label = node.id.removeprefix("chosen:")
        return search(self, label, self.labelled[label], self.expert_scores(), self.held_out())

    def merge(self, node: Node):
        label = node.id.removeprefix("merge:")
        return merge.submit(*self.merge_args(label), self.device, *self.merge_reads(label))

    def merge_part(self, node: Node):
        label, part = node.id.removeprefix("merge:").rsplit(":part", 1)
        spec, base, experts, out_uri, storage, state = self.merge_args(label)
        stats, _, reads = self.merge_reads(label)
        return merge_part.submit(spec, base, experts, out_uri, int(part), self.config.merge_parts, storage, state,
                                 self.device, stats, reads)

    def assemble_merge(self, node: Node):
        label = node.id.removeprefix("merge:")
        return assemble_merge.submit(label, [self.outputs[i] for i in node.inputs], self.merge_args(label)[3],
                                     self.storage)

    def merge_args(self, label: str) -> tuple:
        """(spec, base, experts, output location, storage, sparsify future) of one merge: its location is keyed by
        everything it reads."""
        spec = self.spec_of(label)
        learns = merge_stage.needs_objective(spec)
        out_uri = merge_stage.merge_location(self.config.name, label, spec, self.base, self.experts,
                                             self.storage.root, self.statistics(spec),
                                             (self.tasks, merge_stage.unlabeled_split(label, self)) if learns else None)
        return spec, self.base, self.experts, out_uri, self.storage, self.label_pass(label)

    def merge_reads(self, label: str) -> tuple:
        """(statistics, unlabeled inputs, subspaces) one merge reads."""
        spec = self.spec_of(label)
        learns = merge_stage.needs_objective(spec)
        unlabeled = (self.tasks, merge_stage.unlabeled_split(label, self), self.config.evaluation) if learns else None
        return self.statistics(spec), unlabeled, self.subspaces(spec)

    def evaluate(self, node: Node):
        label = node.id.removeprefix("evaluate:")
        weights = None if node.model is None else self.model_ref(node.model)
        inputs = self.tasks if node.task is None else {node.task: self.tasks[node.task]}
        return evaluate.submit(label, weights, self.base, inputs, self.config.evaluation, self.storage, self.device,
                               self.tracking, self.parent, node.split, node.examples)

    def rows(self) -> dict[str, dict[str, float]]:
        """Test accuracy per task of every model scored on test: "pretrained", "expert:<task>", each merge label."""
        return {node.model.removeprefix("merge:") if node.model else "pretrained": self.value(node.id)
                for node in self.plan if node.kind == "evaluate" and node.split == "test"}

    def record_merge(self, node: Node) -> dict[str, Any]:
        label = node.id.removeprefix("record:")
        ref, record = self.value(f"merge:{label}")
        rows, validation = self.rows(), self.outputs.get(f"evaluate:{label}-validation")
        expert_acc = {n: rows[f"expert:{n}"][n] for n in self.task_configs}
        return record_merge(label, self.spec_of(label), ref, record, rows[label], expert_acc,
                            {n: d for n, (d, _) in self.tasks.items()}, self.storage, self.tracking,
                            self.parent, _value(validation) if validation is not None else None,
                            self.expert_scores())

    def register_model(self, node: Node) -> dict[str, Any] | None:
        return register_best(self.tracking, self.parent, [self.outputs[i] for i in node.inputs if i.startswith("record:")])

    def mark_success(self, node: Node) -> None:
        """The run's records (results, artifacts, its success marker), once every stage submitted has finished."""
        for value in list(self.outputs.values()) + list(self.passes.values()):
            _value(value)  # an error of a stage nothing else read (the overlap check) fails the run here
        names, rows = list(self.task_configs), self.rows()
        expert_acc = {n: rows[f"expert:{n}"][n] for n in names}
        registration = self.outputs.get("register")
        table = format_results_table(rows, names, expert_acc)
        merged = {label: self.model_ref(f"merge:{label}") for label in self.labelled}
        self.summary = {
            "run": self.config.name,
            "mlflow_run_id": self.parent,
            "table": table,
            "accuracy": rows,
            "merged": {label: ref.model_dump() for label, ref in merged.items()},
            "experts": {n: e.model_dump() for n, e in self.experts.items()},
            "base": self.base.model_dump(),
            "registration": registration,
        }
        record_results(self.tracking, self.parent, rows, expert_acc, table, self.summary)
        publish_artifacts(self.config.name, rows, names, expert_acc, table, self.tracking, self.parent, registration)
        mark_success(self.config.name, {"inputs_digest": self.digest(), "flow_run_id": str(runtime.flow_run.id),
                                        "mlflow_run_id": self.parent, "merged": self.summary["merged"],
                                        "stage_seconds": CLOCK.means()}, self.storage)


def _value(value: Any) -> Any:
    return value.result() if isinstance(value, PrefectFuture) else value
