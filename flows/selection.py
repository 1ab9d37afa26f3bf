"""The merge flow's choices on validation data: every swept spec's grid points and every `auto` spec's successive
halving (one sweep-point task per point and rung), the sparsify stage each point reads, and the validation scores
the choices normalise by. Test data is never read here."""

from typing import Any

from mergeflow.config import AUTO, MergeSpec, RunConfig
from mergeflow.stages import (merge as merge_stage, statistics as statistics_stage,
                              subspace as subspace_stage)
from mergeflow.plan import pass_key
from mergeflow.stages.refs import ObjectRef
from tasks.evaluate import evaluate
from tasks.merge import sparsify
from tasks.search import open_search, record_search
from tasks.sweep import select_point, sweep_point


def score_on_validation(config: RunConfig, parent: str, base, models: dict[str, ObjectRef], eval_inputs,
                        all_tasks: bool = False, examples: int | None = None) -> dict[str, Any]:
    """Futures of validation accuracy (on the first `examples`, default `tuning.max_examples`, per task): of each
    expert on its own task, or (`all_tasks`) of each model on every task; child runs `evaluate-<name>-validation`
    (`-<examples>` when given)."""
    storage, device, tuning = config.storage, config.device, config.tuning
    label = ("{}-validation" if all_tasks else "expert-{}-validation") + (f"-{examples}" if examples else "")
    return {name: evaluate.submit(label.format(name), model, base, eval_inputs if all_tasks else
                                  {name: eval_inputs[name]}, config.evaluation, storage, device, config.tracking,
                                  parent, "validation", examples or tuning.max_examples)
            for name, model in models.items()}


def tune(config: RunConfig, parent: str, plan: dict[str, MergeSpec], base, experts, eval_inputs, expert_val,
         subspaces, statistics) -> dict[str, MergeSpec]:
    """Sweep every spec with a grid, and search every `auto` spec, on validation data (one task per point) and
    return the chosen specs."""
    swept = {label: spec for label, spec in plan.items() if spec.sweep is not None}
    searched = {label: spec for label, spec in plan.items() if spec.method == AUTO}
    if not swept and not searched:
        return {}
    storage, device, tuning = config.storage, config.device, config.tuning
    passes: dict[str, Any] = {}  # one sparsify stage per distinct global pass among the grid points

    def reads(method: str, params: dict[str, Any]) -> tuple[dict[str, Any] | None, Any]:
        """(the subspaces, the future of the sparsify stage) one grid point reads."""
        point = MergeSpec(method=method, params=params)
        kinds = {kind: subspaces[kind] for kind in subspace_stage.subspace_kinds([point])} or None
        key = pass_key(point)
        if key is None:
            return kinds, None
        if key not in passes:
            passes[key] = sparsify.submit(point, base, experts, storage, device, config.tracking, parent)
        return kinds, passes[key]

    futures = {}
    for label, spec in swept.items():
        futures[label] = [(params, sweep_point.submit(label, i, spec.method, params, base, experts, eval_inputs,
                                                      tuning, config.evaluation, storage, device, config.tracking,
                                                      parent, *reads(spec.method, params)))
                          for i, params in enumerate(spec.grid_points())]
    expert_acc = {n: f.result()[n] for n, f in expert_val.items()}
    chosen = {label: _search(config, parent, label, spec, base, experts, eval_inputs, expert_acc, reads, statistics)
              for label, spec in searched.items()}
    for label, spec in swept.items():
        points = [params for params, _ in futures[label]]
        accuracies = [future.result()["accuracy"] for _, future in futures[label]]
        params = select_point(label, spec, points, accuracies, expert_acc, tuning, config.tracking, parent)
        chosen[label] = MergeSpec(method=spec.method, params=params)
    return chosen


def _search(config: RunConfig, parent: str, label: str, spec: MergeSpec, base, experts, eval_inputs,
            expert_acc: dict[str, float], reads, statistics) -> MergeSpec:
    """Successive halving over the `auto` spec's candidates (`mergeflow.search`): each rung's candidates are
    sweep points (tasks, scored on the first n validation examples of every task and cached by that n), so a
    rerun or a grown budget scores only what is new; returns the winner's spec."""
    from mergeflow.search import rung_sizes, successive_halving

    search, tuning = spec.search_settings(), config.tuning
    pool = search.candidates()
    sizes = rung_sizes(search.min_examples, tuning.max_examples, search.eta)
    run_id = open_search(label, search, len(pool), sizes, tuning, config.tracking, parent)

    def score_rung(rung: int, examples: int, candidates) -> list[dict[str, float]]:
        at = tuning.model_copy(update={"max_examples": examples})
        futures = []
        for i, c in enumerate(candidates):
            point = MergeSpec(method=c.method, params=c.params)
            stats = statistics if statistics_stage.statistic_kinds([point]) else None
            learn_on = "validation" if merge_stage.needs_objective(point) else None  # inputs only, never labels
            futures.append(sweep_point.submit(f"{label}-r{rung}", i, c.method, c.params, base, experts, eval_inputs,
                                              at, config.evaluation, config.storage, config.device, config.tracking,
                                              run_id, *reads(c.method, c.params), stats,
                                              {"mergeflow.rung": str(rung), "mergeflow.candidate": c.name},
                                              learn_on))
        accuracies = [f.result() for f in futures]
        print(f"search {label}: rung {rung} scored {len(candidates)} candidates on {examples} validation examples "
              "per task")
        return accuracies

    # normalised scores divide by each expert's accuracy measured once, on the cap's examples (never a rung's few)
    result = successive_halving(pool, score_rung, expert_acc, min_examples=search.min_examples,
                                max_examples=tuning.max_examples, eta=search.eta, rule=tuning.rule,
                                floor=tuning.floor, max_evaluations=search.max_evaluations,
                                max_seconds=search.max_seconds, confidence=search.confidence,
                                extend_edges=search.extend_edges)
    chosen = record_search(label, result, config.tracking, parent, run_id)
    print(f"search {label}: chose {result.winner.name} (validation norm. avg "
          f"{100 * result.winner_score.norm_avg:.1f}%) from {len(pool)} candidates in {result.seconds:.0f} s"
          + (f"; stopped early: {result.stopped}" if result.stopped else ""))
    return MergeSpec(method=chosen["method"], params=chosen["params"])
