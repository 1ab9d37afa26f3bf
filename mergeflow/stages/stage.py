"""What every stage of a plan declares, and what it reads: a `Stage` (its kind, where its output lands, how it runs in
process) and the `Context` a stage reads its inputs from (the run config, the store, the outputs of the plan's
earlier nodes).

The same two functions serve all three readers of a plan: `mergeflow plan` asks `where` of each node (is the output
already stored?), the command line's executor (`stages/in_process.py`) calls `run`, and the flow's executor
(`flows/plan_run.py`) calls `run` through a Prefect task (a dedicated one where a stage records more in MLflow).
A stage module lists its stages in `STAGES`; the planner (`mergeflow/plan.py`) reads every module's list.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from mergeflow.config import AUTO, MergeSpec, RunConfig
from mergeflow.stages.refs import ObjectRef
from mergeflow.stages.store import Store

# (output location, how to reference it once it is stored); None: the location cannot be known before the run
Located = tuple[str, Callable[[], Any]] | None


class Pending(Exception):
    """A node's output is read before it is known (`mergeflow plan`: its location waits on that node)."""

    def __init__(self, id: str):
        super().__init__(id)
        self.id = id


@dataclass(frozen=True)
class Stage:
    """One kind of plan node. `where(node, ctx)`: where its output will be stored, from its inputs' references
    (None for the bookkeeping kinds, whose records every run writes); `run(node, ctx)`: run it in process and
    return its output (None: only the flow runs it, e.g. its MLflow records)."""

    name: str
    where: Callable[[Node, Context], Located] | None = None
    run: Callable[[Node, Context], Any] | None = None


# kinds a running context runs when first read, where only a search reads them (`Context.on_demand`)
ON_DEMAND = frozenset({"compute_statistics"})
# kinds that run as a stage task and report to the progress clock; the others are bookkeeping (no estimate)
UNTIMED = frozenset({"open_search", "record_search", "select_point", "register_model"})


@dataclass(frozen=True)
class Node:
    id: str  # unique in its plan, e.g. "expert:newsgroups", "sweep:ties-tuned:3", "merge:tsv"
    kind: str  # the stage task's name
    inputs: tuple[str, ...] = ()
    about: str = ""  # what a reader needs besides the kind (method and params, split, examples)
    spec: MergeSpec | None = None  # sparsify, sweep_point, merge: the merge (or grid point) it runs
    model: str | None = None  # evaluate: the node whose output it scores (None: the pretrained model)
    task: str | None = None  # the task it concerns (evaluate: only this task's data; else every task's)
    split: str | None = None  # evaluate, sweep_point: the split scored
    examples: int | None = None  # evaluate, sweep_point: examples scored per task (None: all)
    share: float | None = None  # compute_statistics: the share of its examples (an `auto` search's early rungs);
    # sweep_point: of the statistics' examples it reads
    part_of: str | None = None  # run by that node, not by a walk of the plan: an `auto` search's opening, rungs
    # (estimated here), the sparsify passes and statistics only its candidates read, run by its `chosen:<label>` node
    stage: Stage = field(default=None, compare=False, repr=False)  # what runs it (its `kind`'s stage)

    @property
    def timed(self) -> bool:
        return self.kind not in UNTIMED


@dataclass
class Plan:
    run: str
    stages: Mapping[str, Stage]  # the kinds of node it may hold (`mergeflow.plan.STAGES`)
    nodes: list[Node] = field(default_factory=list)

    def add(self, id: str, kind: str, inputs: tuple[str, ...] | list[str] = (), about: str = "", **fields: Any
            ) -> str:
        if kind not in self.stages:
            raise KeyError(f"plan node {id!r}: no stage of kind {kind!r} (each stage module lists its `STAGES`)")
        self.nodes.append(Node(id, kind, tuple(inputs), about, **fields, stage=self.stages[kind]))
        return id

    def node(self, id: str) -> Node:
        return next(node for node in self.nodes if node.id == id)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def counts(self) -> dict[str, int]:
        """Stage runs of each timed kind: what the progress lines count."""
        return dict(Counter(node.kind for node in self.nodes if node.timed))

    def mermaid(self, status: dict[str, str] | None = None) -> str:
        """The graph as a Mermaid flowchart (nodes styled by `status`: "stored" or "to run")."""
        ids = {node.id: f"n{i}" for i, node in enumerate(self.nodes)}
        lines = ["flowchart LR"]
        for node in self.nodes:
            text = f"{node.kind}<br/>{node.id}" + (f"<br/>{node.about}" if node.about else "")
            lines.append(f'  {ids[node.id]}["{text.replace(chr(34), chr(39))}"]')
        for node in self.nodes:
            lines += [f"  {ids[source]} --> {ids[node.id]}" for source in node.inputs if source in ids]
        if status:
            lines += ["  classDef stored fill:#d4f4dd,stroke:#2e7d32", "  classDef torun fill:#fff3cd,stroke:#b7791f"]
            for node in self.nodes:
                state = status.get(node.id)
                if state in ("stored", "to run"):
                    lines.append(f"  class {ids[node.id]} {'stored' if state == 'stored' else 'torun'}")
        return "\n".join(lines) + "\n"


class Context:
    """A run's inputs as a stage reads them: the config, the store, the device, the plan and the outputs of its
    earlier nodes (`value(id)`; an unknown one raises `Pending`)."""

    def __init__(self, config: RunConfig, store: Store, device: str, plan: Plan | None = None,
                 outputs: Mapping[str, Any] | None = None):
        self.config, self.store, self.device, self.plan = config, store, device, plan
        self.outputs: dict[str, Any] = dict(outputs or {})
        self.passes: dict[str, Any] = {}  # sparsify pass key -> its output (points with one key share it)
        self.searches: dict[str, Any] = {}  # merge label -> its `auto` search's result (the leaderboard)
        self.task_configs = {t.name: t for t in config.tasks}
        self.labelled = dict(zip(config.merge_labels(), config.merges))

    def value(self, id: str) -> Any:
        if id not in self.outputs:
            raise Pending(id)
        return self.outputs[id]

    def on_demand(self, id: str) -> Node | None:
        """The node `id` when a running context runs it the first time it is read, not on its walk of the plan: the
        statistics only an `auto` search reads (`ON_DEMAND`); None for any other."""
        node = next((n for n in self.plan if n.id == id), None) if self.plan is not None else None
        return node if node is not None and node.part_of is not None and node.kind in ON_DEMAND else None

    @property
    def base(self) -> ObjectRef:
        return self.value("pretrained")

    @property
    def experts(self) -> dict[str, ObjectRef]:
        return {n: self.value(f"expert:{n}") for n in self.task_configs}

    @property
    def tasks(self) -> dict[str, tuple[ObjectRef, ObjectRef]]:
        """Each task's (dataset, head)."""
        return {n: (self.value(f"dataset:{n}"), self.value(f"head:{n}")) for n in self.task_configs}

    def model_ref(self, id: str) -> ObjectRef:
        """The reference of a node's model: an expert's, or a merge's (whose output is its reference and record)."""
        value = self.value(id)
        return value[0] if isinstance(value, tuple) else value

    def spec_of(self, label: str) -> MergeSpec:
        """A merge's spec: for a swept or searched merge, the point chosen on validation."""
        for chosen in (f"select:{label}", f"chosen:{label}"):
            if chosen in self.outputs:
                return self.value(chosen)
        spec = self.labelled[label]
        if spec.sweep is not None:
            raise Pending(f"select:{label}")
        if spec.method == AUTO:
            raise Pending(f"chosen:{label}")
        return spec

    def expert_scores(self) -> dict[str, float]:
        """Each expert's validation score on its own task (the reference of every choice; empty when the run
        chooses nothing)."""
        ids = {n: f"evaluate:expert-{n}-validation" for n in self.task_configs}
        planned = {node.id for node in self.plan} if self.plan is not None else set(self.outputs)
        return {n: self.value(id)[n] for n, id in ids.items() if id in planned}

    def overlap(self) -> dict[str, dict[str, Any]]:
        """The overlap check's result per task ({"validation", "in_train", "positions"}; empty where the run checks
        nothing)."""
        planned = {node.id for node in self.plan} if self.plan is not None else set(self.outputs)
        return self.value("overlap") if "overlap" in planned else {}

    def held_out(self) -> dict[str, dict[str, Any]]:
        """The overlap check's result where the choices leave leaked examples out (`tuning.leaked`: "hold_out");
        empty where they read them ("read")."""
        return self.overlap() if self.config.tuning.leaked == "hold_out" else {}

    def leaked(self) -> dict[str, list[int]]:
        """Per task, the positions in its validation split of examples the choices leave out."""
        from mergeflow.hygiene import leaked_positions

        return leaked_positions(self.held_out())
