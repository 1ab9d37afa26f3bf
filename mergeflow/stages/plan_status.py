"""Which nodes of a plan are already stored, before anything runs: each stage's own location function
(`dataset_location`, `expert_location`, ...) applied to the references of its stored inputs.

A node is "stored" when its output is in the store (the run reuses it), "to run" when its location is known and
empty, "after <node>" when its location depends on an input that will run first (unknown until then), and
"runs" for the bookkeeping every run does (records, the registry, selecting a grid point). Only stored objects are
read: digests come from the content cache, no model is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping

from mergeflow.config import MergeSpec, RunConfig
from mergeflow.errors import MergeflowError
from mergeflow.families import get_family
from mergeflow.plan import Node, Plan
from mergeflow.stages import merge as merge_stage, statistics as statistics_stage
from mergeflow.stages.data import dataset_location, head_location
from mergeflow.stages.evaluate import evaluation_location
from mergeflow.stages.fetch import latest_checkpoint
from mergeflow.stages.finetune import expert_location
from mergeflow.stages.refs import ModelRef, ObjectRef, builtin_model_uri, subspace_uri
from mergeflow.stages.sparsify import pass_location
from mergeflow.stages.store import Store
from mergeflow.stages.sweep import point_location
from mergeflow.storage import directory_digest, fetch_directory

STORED, TO_RUN, RUNS = "stored", "to run", "runs"
BOOKKEEPING = frozenset({"check_unchanged", "open_search", "record_search", "record_merge",
                         "register_model", "mark_success", "check_overlap"})


class _Resolver:
    def __init__(self, config: RunConfig, plan: Plan, store: Store):
        self.config, self.plan, self.store = config, plan, store
        self.refs: dict[str, ObjectRef] = {}
        self.uris: dict[str, str] = {}  # stored nodes' locations
        self.chosen: dict[str, MergeSpec] = {}  # swept merges whose points are all stored: the point chosen
        self.status: dict[str, str] = {}
        self.tasks = {t.name: t for t in config.tasks}

    def waiting(self, ids: list[str]) -> str | None:
        """The first of `ids` whose output is not known yet (None: all known)."""
        return next((i for i in ids if i not in self.refs), None)

    def settle(self, node: Node, uri: str | None, ref=None) -> None:
        if uri is None:
            return
        if self.store.exists(uri):
            self.status[node.id] = STORED
            self.uris[node.id] = uri
            self.refs[node.id] = ref() if ref else ObjectRef(uri=uri, sha256="")
        else:
            self.status[node.id] = TO_RUN

    def directory_ref(self, uri: str, recursive: bool = False) -> ObjectRef:
        _, files = fetch_directory(uri, self.store.cache, self.store.options, recursive=recursive)
        return ObjectRef(uri=uri, sha256=directory_digest(files))

    def inputs(self) -> Mapping[str, tuple[ObjectRef, ObjectRef]]:
        return {n: (self.refs[f"dataset:{n}"], self.refs[f"head:{n}"]) for n in self.tasks}

    def resolve(self, node: Node) -> None:
        if node.kind in BOOKKEEPING:
            self.status[node.id] = RUNS
            return
        needed = self.needs(node)
        if (first := self.waiting(needed)) is not None:
            self.status[node.id] = f"after {first}"
            return
        getattr(self, node.kind)(node)

    def needs(self, node: Node) -> list[str]:
        """The nodes whose outputs decide this node's location."""
        experts = [f"expert:{n}" for n in self.tasks]
        data = [f"{kind}:{n}" for n in self.tasks for kind in ("dataset", "head")]
        if node.kind in ("fetch_pretrained", "prepare_dataset", "fetch_expert", "fetch_latest_expert"):
            return []
        if node.kind == "fit_head":
            return ["pretrained", f"dataset:{node.task}"]
        if node.kind == "finetune_expert":
            return ["pretrained", f"dataset:{node.task}", f"head:{node.task}"]
        if node.kind == "compute_statistics":
            return [f"expert:{node.task}", f"dataset:{node.task}", f"head:{node.task}"]
        if node.kind in ("build_subspace", "sparsify"):
            return ["pretrained", *experts]
        reads_statistics = node.spec is not None and bool(statistics_stage.statistic_kinds([node.spec]))
        statistics = [f"statistics:{n}" for n in self.tasks] if reads_statistics else []
        if node.kind == "sweep_point":
            return ["pretrained", *experts, *data, *(statistics if node.id.startswith("search:") else [])]
        if node.kind in ("merge", "merge_part", "assemble_merge"):
            chosen = [i for i in node.inputs if i.startswith(("select:", "chosen:"))]
            return [*chosen, "pretrained", *experts, *statistics, *data]
        if node.kind == "select_point":
            return list(node.inputs)
        if node.kind == "evaluate":
            return ["pretrained", *([node.model] if node.model else []), *data]
        return list(node.inputs)

    # one method per kind: the stage's own location function on the inputs' references

    def fetch_pretrained(self, node: Node) -> None:
        model = self.config.model
        if model.pretrained in get_family(model.family).builtin_models:
            uri = builtin_model_uri(self.store.root, model.pretrained)
            self.settle(node, uri, lambda: ModelRef(**self.directory_ref(uri).model_dump(), family=model.family))
        else:  # the user's directory, read where it is
            self.settle(node, model.pretrained,
                        lambda: ModelRef(**self.directory_ref(model.pretrained).model_dump(), family=model.family))

    def prepare_dataset(self, node: Node) -> None:
        given = self.tasks[node.task].dataset
        uri = given or dataset_location(node.task, self.config.data, self.store.root)
        self.settle(node, uri, lambda: self.directory_ref(uri, recursive=bool(given)))

    def fit_head(self, node: Node) -> None:
        given = self.tasks[node.task].head
        if given:
            self.settle(node, given, lambda: ObjectRef(uri=given, sha256=self.store.fetch(given).sha256))
            return
        uri = head_location(node.task, self.refs["pretrained"], self.refs[f"dataset:{node.task}"],
                            self.config.evaluation, self.store.root)
        self.settle(node, uri, lambda: self.store.file_ref(uri))

    def fetch_expert(self, node: Node) -> None:
        uri = self.tasks[node.task].expert
        self.settle(node, uri, lambda: self.store.checkpoint_ref(uri))

    def fetch_latest_expert(self, node: Node) -> None:
        try:
            uri = latest_checkpoint(self.tasks[node.task].latest, self.store)
        except MergeflowError:
            self.status[node.id] = TO_RUN
            return
        self.settle(node, uri, lambda: self.store.checkpoint_ref(uri))

    def finetune_expert(self, node: Node) -> None:
        n = node.task
        uri = expert_location(n, self.refs["pretrained"], self.refs[f"dataset:{n}"], self.refs[f"head:{n}"],
                              self.config.finetune, self.store.root)
        self.settle(node, uri, lambda: self.store.checkpoint_ref(uri))

    def compute_statistics(self, node: Node) -> None:
        n = node.task
        kinds = statistics_stage.statistic_kinds(self.config.merges)
        uri = statistics_stage.statistics_location(self.refs[f"expert:{n}"], self.refs[f"dataset:{n}"],
                                                   self.refs[f"head:{n}"], kinds, self.config.statistics)
        self.settle(node, uri, lambda: self.store.file_ref(uri))

    def experts(self) -> dict[str, ObjectRef]:
        return {n: self.refs[f"expert:{n}"] for n in self.tasks}

    def statistics_of(self, node: Node) -> dict[str, ObjectRef] | None:
        if node.spec is None or not statistics_stage.statistic_kinds([node.spec]):
            return None
        return {n: self.refs[f"statistics:{n}"] for n in self.tasks}

    def build_subspace(self, node: Node) -> None:
        self.settle(node, subspace_uri(self.store.root, node.about, self.refs["pretrained"], self.experts()))

    def sparsify(self, node: Node) -> None:
        self.settle(node, pass_location(node.spec, self.refs["pretrained"], self.experts(), self.store.root))

    def sweep_point(self, node: Node) -> None:
        """A plain sweep's point reads neither statistics nor data to learn on; a search's candidate may."""
        tuning = self.config.tuning.model_copy(update={"max_examples": node.examples})
        searched = node.id.startswith("search:")
        learn_on = "validation" if searched and merge_stage.needs_objective(node.spec) else None
        self.settle(node, point_location(node.spec.method, node.spec.params, self.refs["pretrained"], self.experts(),
                                         self.inputs(), tuning, self.config.evaluation, self.store.root,
                                         self.statistics_of(node) if searched else None, learn_on))

    def select_point(self, node: Node) -> None:
        """Every point and expert score stored: the choice the run will make, by the same rule."""
        from mergeflow.sweep import choose, score_point

        self.status[node.id] = RUNS
        label = node.id.split(":", 1)[1]
        spec = dict(zip(self.config.merge_labels(), self.config.merges))[label]
        tuning = self.config.tuning
        experts = {n: self.store.read_json(self.uris[f"evaluate:expert-{n}-validation"])["accuracy"][n]
                   for n in self.tasks}
        points = [self.plan.node(i) for i in node.inputs if i.startswith("sweep:")]
        scores = [score_point(p.spec.params, self.store.read_json(self.uris[p.id])["accuracy"], experts,
                              tuning.rule, tuning.floor) for p in points]
        self.chosen[label] = MergeSpec(method=spec.method, params=choose(scores, list(spec.grid())).params)
        self.refs[node.id] = ObjectRef(uri="", sha256="")

    def merge(self, node: Node) -> None:
        spec, label = node.spec, node.id.split(":", 1)[1]
        if spec.sweep is not None:  # resolved by select_point (an `auto` merge waits on its search: `needs`)
            spec = self.chosen[label]
        learns = merge_stage.needs_objective(spec)
        uri = merge_stage.merge_location(self.config.name, label, spec, self.refs["pretrained"], self.experts(),
                                         self.store.root, self.statistics_of(node),
                                         (self.inputs(), self.config.statistics.unlabeled_split) if learns else None)
        self.settle(node, uri, lambda: self.store.checkpoint_ref(uri))

    assemble_merge = merge

    def merge_part(self, node: Node) -> None:
        self.status[node.id] = self.status.get(node.id.rsplit(":", 1)[0], TO_RUN)

    def evaluate(self, node: Node) -> None:
        tasks = self.inputs() if node.task is None else {node.task: self.inputs()[node.task]}
        weights = self.refs[node.model] if node.model else None
        self.settle(node, evaluation_location(weights, self.refs["pretrained"], tasks, self.config.evaluation,
                                              self.store.root, node.split or "test", node.examples))


def plan_status(config: RunConfig, plan: Plan, store: Store) -> dict[str, str]:
    """The status of every node of `plan` (see the module's docstring), in the plan's order."""
    resolver = _Resolver(config, plan, store)
    parts = [node for node in plan if node.kind == "merge_part"]
    for node in [node for node in plan if node.kind != "merge_part"] + parts:  # a part follows its assembly
        resolver.resolve(node)
    return {node.id: resolver.status[node.id] for node in plan}
