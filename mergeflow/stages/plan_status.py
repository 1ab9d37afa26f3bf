"""Which nodes of a plan are already stored, before anything runs: each stage's own `where` (its output location,
`mergeflow.stages.stage.Stage`) applied to the references of its stored inputs.

A node is "stored" when its output is in the store (the run reuses it), "to run" when its location is known and
empty, "after <node>" when its location depends on an input that will run first (unknown until then), and
"runs" for the bookkeeping every run does (records, the registry, selecting a grid point). Only stored objects are
read: digests come from the content cache, no model is loaded.
"""

from __future__ import annotations

from mergeflow.config import RunConfig
from mergeflow.plan import Node, Plan
from mergeflow.stages.stage import Context, Pending
from mergeflow.stages.store import Store
from mergeflow.stages.sweep import choose_point

STORED, TO_RUN, RUNS = "stored", "to run", "runs"


def _select(node: Node, ctx: Context, uris: dict[str, str]) -> None:
    """Every point and expert score stored: the choice the run will make, by the same rule."""
    points = [i for i in node.inputs if i.startswith("sweep:")]
    experts = [i for i in node.inputs if i.startswith("evaluate:expert-")]
    for id in points + experts:
        ctx.value(id)  # Pending until stored
    accuracies = {i: ctx.store.read_json(uris[i])["accuracy"] for i in points}
    scores = {n: ctx.store.read_json(uris[f"evaluate:expert-{n}-validation"])["accuracy"][n]
              for n in ctx.task_configs}
    ctx.outputs[node.id] = choose_point(node, ctx, accuracies, scores)[0]


def plan_status(config: RunConfig, plan: Plan, store: Store) -> dict[str, str]:
    """The status of every node of `plan` (see the module's docstring), in the plan's order."""
    ctx = Context(config, store, "cpu", plan)
    status: dict[str, str] = {}
    uris: dict[str, str] = {}  # stored nodes' locations
    parts = [node for node in plan if node.kind == "merge_part"]
    for node in [node for node in plan if node.kind != "merge_part"] + parts:  # a part follows its assembly
        if node.kind == "merge_part":
            status[node.id] = status.get(node.id.rsplit(":", 1)[0], TO_RUN)
            continue
        try:
            if node.kind == "select_point":
                _select(node, ctx, uris)
                status[node.id] = RUNS
                continue
            if node.stage.where is None:
                status[node.id] = RUNS
                continue
            located = node.stage.where(node, ctx)
        except Pending as waiting:
            status[node.id] = f"after {waiting.id}"
            continue
        if located is None:
            status[node.id] = TO_RUN
        elif store.exists(located[0]):
            status[node.id], uris[node.id] = STORED, located[0]
            ctx.outputs[node.id] = located[1]()
        else:
            status[node.id] = TO_RUN
    return {node.id: status[node.id] for node in plan}
