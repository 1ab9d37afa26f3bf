"""The merge flow's `auto` search on validation data: successive halving with racing over the candidates, one
sweep-point task per candidate and rung; the rungs' sizes and survivors are known only as it runs (the plan
estimates them). Test data is never read here."""

from typing import TYPE_CHECKING

from mergeflow.config import MergeSpec
from mergeflow.hygiene import held_out_note, leaked_positions
from mergeflow.search import rung_sizes, successive_halving
from mergeflow.stages import merge as merge_stage
from tasks.search import open_search, record_search
from tasks.sweep import sweep_point

if TYPE_CHECKING:
    from flows.plan_run import PlanRun


def search(run: "PlanRun", label: str, spec: MergeSpec, expert_acc: dict[str, float],
           overlap: dict[str, dict] | None = None) -> MergeSpec:
    """Successive halving over the `auto` spec's candidates (`mergeflow.search`) in the flow's `run`
    (`flows.plan_run.PlanRun`: its inputs, subspaces, statistics and sparsify passes): each rung's candidates are
    sweep points (tasks, scored on the first n validation examples of every task and cached by that n), so a
    rerun or a grown budget scores only what is new; each task is read on its validation examples that are not
    training examples (`overlap`: the overlap check's result); returns the winner's spec."""
    config, parent = run.config, run.parent
    leaked = leaked_positions(overlap or {})
    if note := held_out_note(overlap or {}, config.tuning.max_examples):
        print(f"search {label}: {note}")
    settings, tuning = spec.search_settings(), config.tuning
    pool = settings.candidates()
    sizes = rung_sizes(settings.min_examples, tuning.max_examples, settings.eta)
    run_id = open_search(label, settings, len(pool), sizes, tuning, config.tracking, parent)

    def score_rung(rung: int, examples: int, candidates) -> list[dict[str, float]]:
        at = tuning.model_copy(update={"max_examples": examples})
        futures = []
        for i, c in enumerate(candidates):
            point = MergeSpec(method=c.method, params=c.params)
            learn_on = "validation" if merge_stage.needs_objective(point) else None  # inputs only, never labels
            futures.append(sweep_point.submit(f"{label}-r{rung}", i, c.method, c.params, run.base, run.experts,
                                              run.tasks, at, config.evaluation, config.storage, config.device,
                                              config.tracking, run_id, run.subspaces(point), run.pass_of(point),
                                              run.statistics(point, c.statistics),
                                              {"mergeflow.rung": str(rung), "mergeflow.candidate": c.name},
                                              learn_on, c.resume_from))
        accuracies = [f.result() for f in futures]
        print(f"search {label}: rung {rung} scored {len(candidates)} candidates on {examples} validation examples "
              "per task")
        return accuracies

    # normalised scores divide by each expert's accuracy measured once, on the cap's examples (never a rung's few)
    result = successive_halving(pool, score_rung, expert_acc, min_examples=settings.min_examples,
                                max_examples=tuning.max_examples, eta=settings.eta, rule=tuning.rule,
                                floor=tuning.floor, max_evaluations=settings.max_evaluations,
                                max_seconds=settings.max_seconds, confidence=settings.confidence,
                                extend_edges=settings.extend_edges, fidelity=settings.fidelity, leaked=leaked)
    chosen = record_search(label, result, config.tracking, parent, run_id)
    print(f"search {label}: chose {result.winner.name} (validation norm. avg "
          f"{100 * result.winner_score.norm_avg:.1f}%) from {len(pool)} candidates in {result.seconds:.0f} s"
          + (f"; stopped early: {result.stopped}" if result.stopped else ""))
    return MergeSpec(method=chosen["method"], params=chosen["params"])
