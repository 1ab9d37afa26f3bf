"""The `auto` search as a stage: successive halving with racing (`mergeflow.search`) over a merge's candidates,
each rung's candidates scored by the sweep-point stage on the first n validation examples of every task (stored by
that n: a rerun or a grown budget scores only what is new). The command line runs it here, in process; the flow
runs the same rungs as Prefect tasks (`flows/selection.py`). Test data is never read."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from mergeflow.config import MergeSpec, SearchConfig, TuningConfig
from mergeflow.stages.stage import Context, Node, Stage
from mergeflow.stages.sweep import score

if TYPE_CHECKING:
    from mergeflow.search import SearchResult


def search(settings: SearchConfig, tuning: TuningConfig, expert_scores: Mapping[str, float], ctx: Context,
           leaked: Mapping[str, Sequence[int]] | None = None) -> SearchResult:
    """Successive halving over `settings`' candidates, normalised by each expert's score measured once on the
    cap's examples (never a rung's few), each task read on its validation examples that are not training examples
    (`leaked`: the others' positions); returns the `SearchResult`."""
    from mergeflow.search import successive_halving

    def score_rung(rung: int, examples: int, chosen: Sequence[Any]) -> list[dict[str, Any]]:
        out = [score(MergeSpec(method=c.method, params=c.params), examples, ctx, c.statistics, c.resume_from)
               for c in chosen]
        print(f"  rung {rung}: {len(chosen)} candidates scored on {examples} validation examples per task")
        return out

    return successive_halving(settings.candidates(), score_rung, expert_scores, min_examples=settings.min_examples,
                              max_examples=tuning.max_examples, eta=settings.eta, rule=tuning.rule,
                              floor=tuning.floor, max_evaluations=settings.max_evaluations,
                              max_seconds=settings.max_seconds, confidence=settings.confidence,
                              extend_edges=settings.extend_edges, fidelity=settings.fidelity, leaked=leaked)


def _record_search(node: Node, ctx: Context) -> MergeSpec:
    from mergeflow.hygiene import held_out_note

    spec = ctx.labelled[node.id.removeprefix("chosen:")]
    if note := held_out_note(ctx.held_out(), ctx.config.tuning.max_examples):
        print(note)
    result = search(spec.search_settings(), ctx.config.tuning, ctx.expert_scores(), ctx, ctx.leaked())
    ctx.searches[node.id.removeprefix("chosen:")] = result  # the leaderboard, for whoever prints it
    return MergeSpec(method=result.winner.method, params=dict(result.winner.params))


STAGES = (Stage("open_search"), Stage("record_search", None, _record_search))
