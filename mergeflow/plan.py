"""A run's plan, compiled once from its config: every stage the merge flow runs, as a graph of typed nodes.

Each node is one stage run of one kind (the kinds are the stage tasks' names: `finetune_expert`, `sweep_point`,
`merge`, `evaluate`, ...), with the nodes it reads. The flow's progress lines count these nodes; `mergeflow plan`
prints them (and which are already stored, `mergeflow_app/planning.py`) before anything runs. The branching here is
the flow's: which merges sparsify, read statistics or subspaces, learn on data, sweep, search or run in parts. An
`auto` search's later rungs are estimated (survivors of successive halving, `SearchConfig.eta`).
"""

from __future__ import annotations


from mergeflow.config import AUTO, MergeSpec, RunConfig
from mergeflow.search import at_fidelity, kept, rung_fidelity, rung_sizes
from mergeflow.stages import data, evaluate, fetch, finetune, search as search_stage
from mergeflow.stages import merge as merge_stage, sparsify as sparsify_stage, statistics as statistics_stage
from mergeflow.stages import subspace as subspace_stage, sweep
from mergeflow.stages.sparsify import pass_key, sparsifies
from mergeflow.stages.stage import UNTIMED, Node, Plan, Stage  # noqa: F401 - the plan's types, read from here

# every kind of node: each stage module's `STAGES`, and the records only the flow writes (MLflow, the registry)
STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("check_unchanged"), Stage("record_merge"), Stage("register_model"), Stage("mark_success"),
    *(stage for module in (fetch, data, finetune, statistics_stage, subspace_stage, sparsify_stage, sweep, search_stage,
                           merge_stage, evaluate) for stage in module.STAGES))}

def search_rungs(spec: MergeSpec, max_examples: int) -> list[tuple[int, int]]:
    """(examples per task, candidates scored) of each rung of an `auto` search that runs every rung: the survivors
    after each rung estimated as ceil(alive / eta) (at least that many: racing also keeps every candidate not
    significantly below the leader, and a close call adds a rung)."""
    search = spec.search_settings()
    alive, rungs = len(search.candidates()), []
    for examples in rung_sizes(search.min_examples, max_examples, search.eta):
        rungs.append((examples, alive))
        alive = kept(alive, search.eta)
    return rungs


def _params(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def compile_plan(config: RunConfig) -> Plan:
    """The plan of one run of the merge flow on `config`."""
    plan = Plan(config.name, STAGES)
    tasks = [t.name for t in config.tasks]
    base = plan.add("pretrained", "fetch_pretrained", about=config.model.pretrained)
    experts = []
    for t in config.tasks:
        dataset = plan.add(f"dataset:{t.name}", "prepare_dataset", task=t.name)
        head = plan.add(f"head:{t.name}", "fit_head", [base, dataset], task=t.name)
        if t.expert:
            experts.append(plan.add(f"expert:{t.name}", "fetch_expert", about=t.expert, task=t.name))
        elif t.latest:
            experts.append(plan.add(f"expert:{t.name}", "fetch_latest_expert", about=t.latest, task=t.name))
        else:
            experts.append(plan.add(f"expert:{t.name}", "finetune_expert", [base, dataset, head], task=t.name))
    data = [f"dataset:{n}" for n in tasks] + [f"head:{n}" for n in tasks]
    if config.skip_unchanged:
        plan.add("unchanged", "check_unchanged", [base, *experts, *data])
    statistics: dict[float, list[str]] = {}  # by the share of the examples they read

    def statistics_at(share: float, part_of: str | None = None) -> list[str]:
        """The experts' statistics on `share` of the examples (added once; `part_of`: only a search reads them, it
        computes them when a candidate first reads them)."""
        if share not in statistics:
            kinds = ", ".join(statistics_stage.statistic_kinds(config.merges))
            statistics[share] = [plan.add(statistics_stage.node_id(n, share), "compute_statistics",
                                          [f"expert:{n}", f"dataset:{n}", f"head:{n}"],
                                          kinds + (f" on {100 * share:g}% of the examples" if share < 1 else ""),
                                          task=n, share=share if share < 1 else None, part_of=part_of)
                                 for n in tasks]
        return statistics[share]

    if any(spec.method != AUTO and statistics_stage.statistic_kinds([spec]) for spec in config.merges):
        statistics_at(1.0)  # a data-aware merge or sweep reads them: walked like any stage
    subspaces = {kind: plan.add(f"subspace:{kind}", "build_subspace", [base, *experts], kind)
                 for kind in subspace_stage.subspace_kinds(config.merges)}
    labelled = dict(zip(config.merge_labels(), config.merges))
    registers = bool(config.tracking.registered_model)
    tuned = any(spec.sweep is not None or spec.method == AUTO for spec in labelled.values())
    expert_val = [plan.add(f"evaluate:expert-{n}-validation", "evaluate", [f"expert:{n}", *data], "validation",
                           model=f"expert:{n}", task=n, split="validation", examples=config.tuning.max_examples)
                  for n in tasks] if registers or tuned else []
    if registers or tuned:  # validation examples that are also training examples: warned about before scoring
        plan.add("overlap", "check_overlap", [base, *data], "validation vs train inputs")
    passes: dict[str, str] = {}

    def reads(spec: MergeSpec, part_of: str | None = None, share: float = 1.0) -> list[str]:
        """The stages one merge or point reads: base, experts, its subspaces, statistics (on `share` of the
        examples) and sparsify pass."""
        found = [base, *experts, *(subspaces[k] for k in subspace_stage.subspace_kinds([spec]))]
        if statistics_stage.statistic_kinds([spec]):
            found += statistics_at(share, part_of)
        key = pass_key(spec)
        if key is not None:
            if key not in passes:
                passes[key] = plan.add(f"sparsify:{len(passes)}", "sparsify", [base, *experts],
                                       f"{spec.method}({_params(sparsify_stage.pass_settings(spec))})", spec=spec,
                                       part_of=part_of)
            found.append(passes[key])
        return found

    chosen: dict[str, list[str]] = {}
    for label, spec in labelled.items():
        if spec.sweep is None:
            continue
        points = [plan.add(f"sweep:{label}:{i}", "sweep_point", [*reads(point), *data], _params(p), spec=point,
                           split="validation", examples=config.tuning.max_examples)
                  for i, p in enumerate(spec.grid_points()) if (point := MergeSpec(method=spec.method, params=p))]
        chosen[label] = [plan.add(f"select:{label}", "select_point", [*points, *expert_val, "overlap"])]
    for label, spec in labelled.items():
        if spec.method != AUTO:
            continue
        searched_by = f"chosen:{label}"
        settings = spec.search_settings()
        candidates = settings.candidates()
        previous = [plan.add(f"search:{label}", "open_search", about=f"{len(candidates)} candidates",
                             part_of=searched_by)]
        rungs = search_rungs(spec, config.tuning.max_examples)
        searched_reads: dict[str, None] = {}
        for rung, (examples, alive) in enumerate(rungs):  # early rungs: iterative methods at reduced counts
            scored = [at_fidelity(c, rung_fidelity(rung, len(rungs), settings.fidelity)) for c in candidates[:alive]]
            points = [MergeSpec(method=c.method, params=c.params) for c in scored]
            read = [reads(point, searched_by, c.statistics) for point, c in zip(points, scored)]
            searched_reads.update(dict.fromkeys(i for found in read for i in found))
            previous = [plan.add(f"search:{label}:{rung}:{j}", "sweep_point", [*read[j], *data, *previous[:1]],
                                 f"{scored[j].name}, {examples} examples", spec=point, split="validation",
                                 examples=examples, share=scored[j].statistics if scored[j].statistics < 1 else None,
                                 part_of=searched_by) for j, point in enumerate(points)]
        if statistics_stage.statistic_kinds([spec]):  # a data-aware survivor's last rung, or winner, reads these
            searched_reads.update(dict.fromkeys(statistics_at(1.0, searched_by)))
        # the search node reads what any candidate reads (its rungs run inside it)
        chosen[label] = [plan.add(searched_by, "record_search", [*previous, *expert_val, *searched_reads, *data,
                                                                 "overlap"])]
    for label, spec in labelled.items():
        # a merge reads its own sparsify stage (a stored pass of a sweep point is reused, but the stage runs)
        inputs = [base, *experts, *chosen.get(label, []), *(subspaces[k] for k in subspace_stage.subspace_kinds(
            [spec]) if spec.method != AUTO)]
        if statistics_stage.statistic_kinds([spec]):  # an `auto` merge reads them only if a data-aware point wins
            inputs += statistics_at(1.0, f"chosen:{label}" if spec.method == AUTO else None)
        if sparsifies(spec):
            inputs.append(plan.add(f"sparsify:{label}", "sparsify", [base, *experts],
                                   f"{spec.method}({_params(sparsify_stage.pass_settings(spec))})", spec=spec))
        learns = merge_stage.needs_objective(spec)
        if learns:
            inputs += data
        if config.merge_parts > 1 and not learns:
            parts = [plan.add(f"merge:{label}:part{i}", "merge_part", inputs, spec=spec)
                     for i in range(config.merge_parts)]
            plan.add(f"merge:{label}", "assemble_merge", parts, spec.method, spec=spec)
        else:
            plan.add(f"merge:{label}", "merge", inputs, spec.method if spec.sweep is None and spec.method != AUTO
                     else f"{spec.method} (as chosen on validation)", spec=spec)
    plan.add("evaluate:pretrained", "evaluate", [base, *data], "test", split="test")
    for n in tasks:
        plan.add(f"evaluate:expert-{n}", "evaluate", [f"expert:{n}", *data], "test", model=f"expert:{n}", split="test")
    for label in labelled:
        plan.add(f"evaluate:{label}", "evaluate", [f"merge:{label}", *data], "test", model=f"merge:{label}",
                 split="test")
    if registers:
        for label in labelled:
            plan.add(f"evaluate:{label}-validation", "evaluate", [f"merge:{label}", *data], "validation",
                     model=f"merge:{label}", split="validation", examples=config.tuning.max_examples)
    records = [plan.add(f"record:{label}", "record_merge", [f"merge:{label}", f"evaluate:{label}"])
               for label in labelled]
    if registers:
        plan.add("register", "register_model", [*records, *(f"evaluate:{label}-validation" for label in labelled)],
                 config.tracking.registered_model or "")
    plan.add("success", "mark_success", records)
    return plan
