"""`method: auto`: the best merge across methods, by successive halving on validation data.

Every method that applies to the inputs is a set of candidates, one per point of its grid (`AUTO_GRIDS`, or the
config's own: `mergeflow.search_space`). Rung 0 scores every candidate on the first few validation examples of each
task; each later rung keeps the best 1/eta of the previous one (and any tied with the last of them), and every other
candidate not significantly below its leader (a paired, one-sided bound on the same examples), and scores them on
eta times as many examples, up to the validation cap, where the winner is chosen (a close call there is settled on
more examples); a point scored again on more examples keeps its earlier ones' credits. A budget (examples scored,
seconds) stops the search early at the last whole rung. An iterative method (`MergeMethod.fidelity`: its step
counts) runs a fraction of its counts at every rung before the last, and its full counts from the last on
(`rung_fidelity`); a data-aware one reads statistics of that share of the examples before the last rung
(`Candidate.statistics`).
The scores are those of `mergeflow.sweep` (validation only); the caller evaluates the winner on test.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from mergeflow.errors import ConfigError
from mergeflow.hygiene import held_out
from mergeflow.search_space import AUTO_GRIDS as AUTO_GRIDS, candidates as candidates  # re-exported
from mergeflow.search_space import DEFAULT_FIDELITY, Candidate, at_fidelity, fidelity_label, rung_fidelity
from mergeflow.sweep import PointScore, Rule, score_point


def kept(alive: int, eta: int) -> int:
    """Candidates that go on to the next rung of successive halving: the best 1/eta, at least one."""
    return max(1, math.ceil(alive / eta))


def rung_sizes(min_examples: int, max_examples: int, eta: int) -> list[int]:
    """Validation examples per task at each rung: min_examples * eta^i, then max_examples (a rung within a factor
    sqrt(eta) of the cap joins the last: 10, 30, 100 for eta 3 and a cap of 100, not 10, 30, 90, 100)."""
    if min_examples < 1 or eta < 2:
        raise ConfigError("search: min_examples must be >= 1 and eta >= 2")
    sizes, n = [], min_examples
    while n * math.sqrt(eta) < max_examples:
        sizes.append(n)
        n *= eta
    return sizes + [max_examples]


@dataclass
class Entry:
    """One candidate scored at one rung."""

    rung: int
    examples: int
    candidate: Candidate
    score: PointScore
    promoted: bool = False
    fidelity: str = "full"  # what the point ran ("steps 100/400", "statistics 25%"; `fidelity_label`)
    reduced: bool = False  # scored with fewer steps or statistics than its own (an early rung)


@dataclass
class SearchResult:
    winner: Candidate
    winner_score: PointScore
    entries: list[Entry]
    rungs_done: int
    rungs_planned: int
    stopped: str | None  # why the search stopped before its last rung (None: it ran them all)
    examples_scored: int  # validation examples per task newly scored, over every candidate and rung
    seconds: float
    timings: list[float] = field(default_factory=list)  # seconds per rung

    def leaderboard(self) -> list[dict[str, Any]]:
        """One row per candidate: its score and fidelity at every rung it reached (best first: deepest rung, then
        score)."""
        rows: dict[str, dict[str, Any]] = {}
        for e in self.entries:
            row = rows.setdefault(e.candidate.name, {"candidate": e.candidate.name, "method": e.candidate.method,
                                                     "params": json.dumps(e.candidate.params, sort_keys=True),
                                                     "rung": e.rung})
            row["rung"] = max(row["rung"], e.rung)
            row[f"rung {e.rung} ({e.examples}/task)"] = round(100 * e.score.norm_avg, 2)
            row[f"rung {e.rung} fidelity"] = e.fidelity
            row["last score"] = e.score.score
        ordered = sorted(rows.values(), key=lambda r: (-r["rung"], -r["last score"]))
        for row in ordered:
            row["chosen"] = "yes" if row["candidate"] == self.winner.name else ""
            row.pop("last score")
        return ordered


@dataclass(frozen=True)
class Scored:
    """One candidate's validation result at a rung: accuracy per task and, where the family gives them, each
    example's credit per task ("0110...": 1 correct, 0 not), in the same example order for every candidate."""

    accuracy: Mapping[str, float]
    correct: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, result: Scored | Mapping[str, Any]) -> Scored:
        """A scorer's result: a `Scored`, a sweep point's record ({"accuracy", "correct"}) or plain accuracies."""
        if isinstance(result, Scored):
            return result
        if "accuracy" in result and isinstance(result["accuracy"], Mapping):
            return cls(result["accuracy"], result.get("correct") or {})
        return cls(result)

    def held_out(self, leaked: Mapping[str, Collection[int]]) -> Scored:
        """This result read on the validation examples that are not training examples (`mergeflow.hygiene`)."""
        return Scored(*held_out(self.accuracy, self.correct, leaked))


Scorer = Callable[[int, int, Sequence[Candidate]], Sequence[Scored | Mapping[str, Any]]]


def rank(scored: Sequence[tuple[int, PointScore]]) -> list[int]:
    """Candidate indices best first: by score; exact ties (left after more data) to the earlier candidate."""
    return [i for i, _ in sorted(scored, key=lambda item: (-item[1].score, item[0]))]


def task_weights(tasks: Sequence[str], expert_accuracy: Mapping[str, float], rule: Rule) -> dict[str, float]:
    """How much one task's accuracy counts in the rule's score: 1 / (T x the expert's accuracy) for normalised
    accuracy (0 where the expert scores 0), 1 / T for the plain average."""
    if rule == "acc.avg":
        return {t: 1 / len(tasks) for t in tasks}
    return {t: 1 / (len(tasks) * expert_accuracy[t]) if expert_accuracy[t] > 0 else 0.0 for t in tasks}


def paired_gap(other: Scored, leader: Scored, weights: Mapping[str, float]) -> tuple[float, float]:
    """(other's score minus the leader's, the standard error of that difference) from the per-example paired
    differences on each task: SE^2 = sum_t w_t^2 s_t^2 / n_t, with s_t^2 the sample variance of the n_t paired
    differences (credit of `other` minus the leader's) on task t. A task without credits adds no error."""
    gap = sum(w * (other.accuracy[t] - leader.accuracy[t]) for t, w in weights.items())
    variance = 0.0
    for t, w in weights.items():
        a, b = other.correct.get(t), leader.correct.get(t)
        if not a or not b or len(a) != len(b) or len(a) < 2:
            continue
        diffs = [int(x) - int(y) for x, y in zip(a, b)]
        mean = sum(diffs) / len(diffs)
        variance += w * w * (sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)) / len(diffs)
    return gap, math.sqrt(variance)


def not_below(scored: Mapping[int, tuple[PointScore, Scored]], leader: int, weights: Mapping[str, float],
              z: float) -> list[int]:
    """The candidates whose score is not significantly below the leader's: gap + z x SE >= 0 (one-sided, paired);
    a floor-rule score of -inf is below any finite one."""
    best_score, best = scored[leader]
    out = []
    for i, (score, result) in scored.items():
        if math.isinf(score.score) and not math.isinf(best_score.score):
            continue
        gap, error = paired_gap(result, best, weights)
        if gap + z * error >= -1e-12:
            out.append(i)
    return out


def successive_halving(pool: Sequence[Candidate], score_rung: Scorer, expert_accuracy: Mapping[str, float], *,
                       min_examples: int, max_examples: int, eta: int = 3, rule: Rule = "norm_acc.avg",
                       floor: float = 0.0, max_evaluations: int | None = None, max_seconds: float | None = None,
                       confidence: float = 0.95, extend_edges: bool = True, fidelity: float = DEFAULT_FIDELITY,
                       leaked: Mapping[str, Collection[int]] | None = None,
                       clock: Callable[[], float] = time.monotonic) -> SearchResult:
    """Run the search, racing: `score_rung(rung, examples, candidates)` returns each candidate's validation result
    (`Scored`: accuracy per task and, where the family gives them, each example's credit) on the first `examples`
    validation examples of every task (the caller scores a rung's candidates at once, in parallel if it can).
    Normalised accuracy divides by each expert's accuracy on its own task, measured once (`expert_accuracy`, on
    the cap's examples), never on a rung's few.

    Each rung keeps its best 1/eta and, beyond them, every candidate whose score is not significantly below the
    leader's (`not_below`: paired differences on the same examples, one-sided at `confidence`), so a candidate is
    never cut by order or by noise. At the last rung, if others are not significantly below the leader, the close
    ones are scored once more on eta times the examples (as many as the split holds): a close decision is settled by
    more data; only candidates identical on every example scored fall back to the earlier one.

    `extend_edges`: where a method's best point at the last rung sits at the edge of its grid, steps past it are
    scored on the last rung's examples (each a rung of one) while they beat it (`next_beyond`); the best of all wins.

    `fidelity`: an iterative candidate (`MergeMethod.fidelity`) is scored at every rung before the last as the point
    with that fraction of its counts (its own params, cached under their own key), and from the last rung on (the
    close call, the steps past an edge) as itself, the plain merge's point: the winner is always at full counts.

    A candidate's point scored at the rung before is scored on from there (`Candidate.resume_from`: the caller keeps
    those examples' credits and scores only the new ones), and only the new ones are counted as scored.

    `max_evaluations` bounds the validation examples scored per task over every candidate and rung; a rung that
    would pass it, or that starts after `max_seconds`, is not run and the best of the last whole rung wins. The
    first rung must fit the budget (else a ConfigError, before any work).

    `leaked`: per task, the positions of validation examples that are also training examples: read without them."""
    from statistics import NormalDist

    sizes = rung_sizes(min_examples, max_examples, eta)
    if max_evaluations is not None and len(pool) * sizes[0] > max_evaluations:
        raise ConfigError(f"search: the budget of {max_evaluations} validation examples per task does not cover the "
                          f"first rung ({len(pool)} candidates x {sizes[0]} examples = {len(pool) * sizes[0]}); "
                          "raise search.max_evaluations or search fewer methods")
    z = NormalDist().inv_cdf(confidence)
    started = clock()
    survivors = list(range(len(pool)))
    entries: list[Entry] = []
    spent, stopped, timings = 0, None, []
    scored_on: dict[int, tuple[Candidate, int]] = {}  # each candidate's last point scored and on how many examples
    best: tuple[int, PointScore] | None = None
    rung, planned = 0, len(sizes)
    while rung < planned:
        examples = sizes[rung] if rung < len(sizes) else sizes[-1] * eta ** (rung - len(sizes) + 1)
        points = {i: at_fidelity(pool[i], rung_fidelity(rung, len(sizes), fidelity)) for i in survivors}
        asked = [_resumed(p, scored_on.get(i)) for i, p in points.items()]
        cost = sum(examples - p.resume_from for p in asked)
        if rung and max_evaluations is not None and spent + cost > max_evaluations:
            stopped = f"budget: rung {rung} needs {cost} more examples per task, " \
                      f"{max_evaluations - spent} left of {max_evaluations}"
            break
        if rung and max_seconds is not None and clock() - started >= max_seconds:
            stopped = f"time: {clock() - started:.0f} s spent of {max_seconds:.0f} s before rung {rung}"
            break
        rung_started = clock()
        raw = [Scored.of(r) for r in score_rung(rung, examples, asked)]
        scored_on.update({i: (p, examples) for i, p in points.items()})
        results = [r.held_out(leaked or {}) for r in raw]
        spent += cost
        scored = {i: (score_point(pool[i].params, r.accuracy, expert_accuracy, rule, floor), r)
                  for i, r in zip(survivors, results, strict=True)}
        read = min(examples, max((len(c) for c in raw[0].correct.values()), default=examples))  # split's end
        rung_entries = {i: Entry(rung, read, pool[i], s, fidelity=fidelity_label(points[i], pool[i]),
                                 reduced=points[i] != pool[i])
                        for i, (s, _) in scored.items()}
        entries += rung_entries.values()
        order = rank([(i, s) for i, (s, _) in scored.items()])
        best = (order[0], scored[order[0]][0])
        weights = task_weights(list(results[0].accuracy), expert_accuracy, rule)
        close = not_below(scored, order[0], weights, z)
        counts = {t: len(c) for t, c in raw[0].correct.items()}
        timings.append(round(clock() - rung_started, 2))
        if rung < len(sizes) - 1:  # the best 1/eta, every candidate tied with the last of them (order never cuts)
            halving = order[:kept(len(order), eta)]
            halving += [i for i in order[len(halving):] if scored[i][0].score == scored[halving[-1]][0].score]
            survivors = halving + [i for i in order if i in close and i not in halving]
        elif len(close) > 1 and counts and min(counts.values()) >= examples:  # close, and the split may hold more
            survivors, planned = [i for i in order if i in close], planned + 1
        else:
            survivors = order[:1]
        for i in survivors:
            rung_entries[i].promoted = True
        rung += 1
    assert best is not None
    winner, winner_score = pool[best[0]], best[1]
    if stopped is None and extend_edges:
        winner, winner_score, spent, stopped = _extend_edges(
            pool, winner, winner_score, entries, timings, score_rung, expert_accuracy, rule, floor, leaked or {},
            examples=entries[-1].examples, spent=spent, max_evaluations=max_evaluations, clock=clock,
            deadline=None if max_seconds is None else started + max_seconds)
    return SearchResult(winner, winner_score, entries, len(timings), max(planned, len(sizes)), stopped, spent,
                        round(clock() - started, 2), timings)


def _resumed(point: Candidate, earlier: tuple[Candidate, int] | None) -> Candidate:
    """`point`, scored on from the examples an earlier rung scored it on when that rung scored the same point (the
    same counts: an iterative method's full point at the last rung is another)."""
    return replace(point, resume_from=earlier[1]) if earlier is not None and earlier[0] == point else point


def next_beyond(values: Sequence[float], chosen: float) -> float | None:
    """The next value of a searched coefficient past the edge of its grid `values` where `chosen` sits (None: not at
    an edge, or fewer than two values): one more step of the grid's spacing, geometric when the grid's values are
    positive and closer to a geometric than to an arithmetic progression (smoothing 1e-6, 1e-3 -> 1)."""
    ordered = sorted(set(values))
    if len(ordered) < 2 or chosen not in (ordered[0], ordered[-1]):
        return None
    up = chosen == ordered[-1]
    a, b = (ordered[-2], ordered[-1]) if up else (ordered[1], ordered[0])
    geometric = ordered[0] > 0 and ordered[-1] / ordered[0] >= 100
    value = b * (b / a) if geometric else b + (b - a)
    return float(f"{value:.10g}")


def _edge_candidate(pool: Sequence[Candidate], winner: Candidate, tried: set[str]) -> Candidate | None:
    """A candidate one step past the edge of the winner's grid, on a numeric coefficient where the winner sits at the
    edge (its other coefficients kept), valid for its method and not tried yet."""
    from mergeflow.methods import build_method

    for key, value in winner.params.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        values = [c.params[key] for c in pool if c.method == winner.method and key in c.params
                  and all(c.params.get(k) == v for k, v in winner.params.items() if k != key)]
        values += [value]
        beyond = next_beyond([float(v) for v in values if isinstance(v, (int, float))], float(value))
        if beyond is None:
            continue
        candidate = Candidate(winner.method, {**winner.params, key: type(value)(beyond) if isinstance(value, int)
                                              else beyond})
        if candidate.name in tried:
            continue
        try:
            build_method(candidate.method, candidate.params)
        except (ConfigError, ValueError):
            continue  # past the coefficient's own bounds
        return candidate
    return None


def _extend_edges(pool, winner, winner_score, entries, timings, score_rung, expert_accuracy, rule, floor, leaked, *,
                  examples, spent, max_evaluations, clock, deadline, max_steps: int = 6):
    """For each method scored at the last rung (best first) whose best point there sits at the edge of its grid,
    score one step past it (on the last rung's examples, as a rung of its own) while that beats the method's best:
    a range is searched, not a list, and a method whose range was cut short can still win. Returns (the best of
    all, its score, examples spent, why it stopped early or None)."""
    tried, grid, last = {c.name for c in pool}, list(pool), entries[-1].rung
    bests: dict[str, tuple[Candidate, PointScore]] = {}
    for e in entries:
        if e.rung == last and (e.candidate.method not in bests or e.score.score > bests[e.candidate.method][1].score):
            bests[e.candidate.method] = (e.candidate, e.score)
    for best, best_score in sorted(bests.values(), key=lambda b: -b[1].score):
        for _ in range(max_steps):
            candidate = _edge_candidate(grid, best, tried)
            if candidate is None:
                break
            if max_evaluations is not None and spent + examples > max_evaluations:
                return winner, winner_score, spent, f"budget: no examples left to try {candidate.name} past the grid"
            if deadline is not None and clock() >= deadline:
                return winner, winner_score, spent, f"time: spent before trying {candidate.name} past the grid"
            tried.add(candidate.name)
            grid.append(candidate)
            rung, started = len(timings), clock()
            result = Scored.of(score_rung(rung, examples, [candidate])[0]).held_out(leaked)
            spent += examples
            score = score_point(candidate.params, result.accuracy, expert_accuracy, rule, floor)
            better = score.score > best_score.score
            entries.append(Entry(rung, examples, candidate, score, better, fidelity_label(candidate, candidate)))
            timings.append(round(clock() - started, 2))
            if not better:
                break
            best, best_score = candidate, score
            if score.score > winner_score.score:
                winner, winner_score = candidate, score
    return winner, winner_score, spent, None

