"""`method: auto`'s search: candidates, rung sizes, successive halving, budgets and the leaderboard."""

from __future__ import annotations

import math

import pytest

from mergeflow.errors import ConfigError
from mergeflow.search import Candidate, Scored, candidates, paired_gap, rung_sizes, successive_halving

EXPERTS = {"a": 0.8, "b": 0.5}


def test_rung_sizes_grow_by_eta_up_to_the_cap():
    assert rung_sizes(10, 100, 3) == [10, 30, 100]
    assert rung_sizes(25, 200, 3) == [25, 75, 200]
    assert rung_sizes(10, 1000, 2) == [10, 20, 40, 80, 160, 320, 640, 1000]
    assert rung_sizes(50, 40, 3) == [40]  # a first rung above the cap is the cap
    with pytest.raises(ConfigError):
        rung_sizes(0, 100, 3)


def test_candidates_cover_every_applicable_method_and_name_refusals():
    every = candidates()
    methods = {c.method for c in every}
    assert {"task_arithmetic", "ties", "dare", "tsv", "iso_c", "iso_cts", "wudi", "doge_ta", "average",
            "regmean", "fisher", "mats"} == methods
    assert not {"adamerging", "doge_am"} & methods  # learned: searched only when named (each a training run)
    assert sum(c.method == "ties" for c in every) == 12
    free = candidates(data_aware=False)
    assert not {"regmean", "fisher", "mats"} & {c.method for c in free}
    narrowed = candidates(["tsv", "regmean"], {"tsv": {"alpha": [1.0, 2.0]}})
    assert [c.name for c in narrowed] == ["tsv(alpha=1.0)", "tsv(alpha=2.0)", "regmean(reduce_non_diagonal_ratio=0.5)",
                                          "regmean(reduce_non_diagonal_ratio=0.8)",
                                          "regmean(reduce_non_diagonal_ratio=0.95)",
                                          "regmean(reduce_non_diagonal_ratio=1.0)"]
    assert [c.name for c in candidates(["adamerging"])] == ["adamerging(steps=100)", "adamerging(steps=500)"]
    with pytest.raises(ConfigError, match="'adamerging' cannot be searched .it learns from unlabeled"):
        candidates(["adamerging"], learned=False)
    with pytest.raises(ConfigError, match="needs statistics"):
        candidates(["regmean"], data_aware=False)
    with pytest.raises(ConfigError, match="scaling"):  # a bad grid value is named before any work
        candidates(["task_arithmetic"], {"task_arithmetic": {"scaling": [-1.0]}})


def _pool(n: int) -> list[Candidate]:
    return [Candidate("task_arithmetic", {"scaling": round(0.1 * (i + 1), 1)}) for i in range(n)]


class Scorer:
    """Accuracy = a quality per candidate plus noise that fades with more examples; records every call."""

    def __init__(self, quality):
        self.quality, self.calls, self.resumed = quality, [], []

    def __call__(self, rung, examples, chosen):
        self.calls.append((rung, examples, [c.params["scaling"] for c in chosen]))
        self.resumed.append([c.resume_from for c in chosen])
        out = []
        for c in chosen:
            q = self.quality(c.params["scaling"])
            noise = 0.3 * math.sin(97 * c.params["scaling"]) / examples
            out.append({"a": 0.8 * (q + noise), "b": 0.5 * (q + noise)})
        return out


def test_halving_keeps_the_best_third_and_finds_the_best_candidate():
    scorer = Scorer(lambda s: 1 - abs(s - 0.7))
    result = successive_halving(_pool(10), scorer, EXPERTS, min_examples=10, max_examples=100, eta=3)
    assert [(r, n, len(c)) for r, n, c in scorer.calls] == [(0, 10, 10), (1, 30, 4), (2, 100, 2)]
    assert result.winner.params == {"scaling": 0.7}
    assert result.rungs_done == result.rungs_planned == 3 and result.stopped is None
    # a candidate's point at the rung before is scored on: its examples are kept, only the new ones are scored
    assert scorer.resumed == [[0] * 10, [10] * 4, [30] * 2]
    assert result.examples_scored == 10 * 10 + 4 * (30 - 10) + 2 * (100 - 30)
    rows = result.leaderboard()
    assert rows[0]["candidate"] == "task_arithmetic(scaling=0.7)" and rows[0]["chosen"] == "yes"
    assert len(rows) == 10 and sum(r["chosen"] == "yes" for r in rows) == 1
    assert "rung 2 (100/task)" in rows[0] and "rung 1 (30/task)" not in rows[-1]
    promoted = [e for e in result.entries if e.rung == 0 and e.promoted]
    assert len(promoted) == 4


def test_without_example_credits_exact_ties_go_to_the_earlier_candidate():
    flat = successive_halving(_pool(5), lambda r, n, chosen: [{"a": 0.4, "b": 0.25}] * len(chosen), EXPERTS,
                              min_examples=5, max_examples=5, eta=3)
    assert flat.winner.params == {"scaling": 0.1}


def test_a_tie_at_the_halving_cut_goes_on_to_the_next_rung():
    """Six candidates, the best third is two: the second and the three tied with it all go on (not the first of them
    by order), to be told apart by more data; the last two, below, do not."""
    quality = {0.1: 0.9, 0.2: 0.5, 0.3: 0.5, 0.4: 0.5, 0.5: 0.1, 0.6: 0.1}
    calls = []

    def score(rung, examples, chosen):
        calls.append((rung, [c.params["scaling"] for c in chosen]))
        return [{"a": 0.8 * quality[c.params["scaling"]], "b": 0.5 * quality[c.params["scaling"]]} for c in chosen]

    successive_halving(_pool(6), score, EXPERTS, min_examples=10, max_examples=90, eta=3, extend_edges=False)
    assert calls[1] == (1, [0.1, 0.2, 0.3, 0.4])


def test_an_evaluation_budget_stops_at_the_last_whole_rung():
    scorer = Scorer(lambda s: s)
    result = successive_halving(_pool(9), scorer, EXPERTS, min_examples=10, max_examples=100, eta=3,
                                max_evaluations=9 * 10 + 3 * 20)  # rungs 0 and 1 (20 new each), not rung 2
    assert [n for _, n, _ in scorer.calls] == [10, 30]
    assert result.rungs_done == 2 and result.rungs_planned == 3 and "budget" in result.stopped
    assert result.winner.params == {"scaling": 0.9} and result.examples_scored == 150


def test_a_budget_below_the_first_rung_fails_before_any_scoring():
    scorer = Scorer(lambda s: s)
    with pytest.raises(ConfigError, match="first rung"):
        successive_halving(_pool(9), scorer, EXPERTS, min_examples=10, max_examples=100, max_evaluations=50)
    assert scorer.calls == []


def test_a_time_budget_starts_no_rung_after_it_is_spent():
    ticks = iter(range(0, 1000, 40))  # each clock reading 40 s later
    scorer = Scorer(lambda s: s)
    result = successive_halving(_pool(9), scorer, EXPERTS, min_examples=10, max_examples=100, eta=3,
                                max_seconds=60, clock=lambda: next(ticks))
    assert len(scorer.calls) == 1 and "time" in result.stopped and result.winner.params == {"scaling": 0.9}


def test_floor_rule_drops_candidates_that_miss_a_task():
    def lopsided(rung, examples, chosen):  # scaling 0.1: best average, but task b far below its expert
        return [{"a": 0.9, "b": 0.2} if c.params["scaling"] == 0.1 else {"a": 0.6, "b": 0.4} for c in chosen]

    assert successive_halving(_pool(3), lopsided, EXPERTS, min_examples=5, max_examples=5,
                              rule="acc.avg").winner.params == {"scaling": 0.1}
    assert successive_halving(_pool(3), lopsided, EXPERTS, min_examples=5, max_examples=5, rule="floor",
                              floor=0.5).winner.params == {"scaling": 0.2}


def test_scores_normalise_by_the_experts_measured_once():
    quality = {0.1: {"a": 0.8, "b": 0.1}, 0.2: {"a": 0.4, "b": 0.4}}

    def score(rung, examples, chosen):
        return [quality[c.params["scaling"]] for c in chosen]

    result = successive_halving(_pool(2), score, {"a": 0.8, "b": 0.5}, min_examples=10, max_examples=100, eta=3,
                                extend_edges=False)
    rung0 = {e.candidate.params["scaling"]: e.score.norm_avg for e in result.entries if e.rung == 0}
    assert rung0 == pytest.approx({0.1: (1.0 + 0.2) / 2, 0.2: (0.5 + 0.8) / 2})
    assert [e.candidate.params["scaling"] for e in result.entries if e.rung == 0 and e.promoted] == [0.2]


def _credits(correct, n: int) -> str:
    """The first n examples' credits of a candidate that gets example i right when correct(i)."""
    return "".join("1" if correct(i) else "0" for i in range(n))


def _racer(patterns, split_size: int = 1000):
    """A scorer whose candidate i answers the same way on both tasks: example j right when patterns[i](j); the
    split holds `split_size` examples."""
    calls = []

    def score(rung, examples, chosen):
        calls.append((rung, examples, [c.params["scaling"] for c in chosen]))
        n = min(examples, split_size)
        out = []
        for c in chosen:
            credits = _credits(patterns[round(c.params["scaling"] * 10) - 1], n)
            out.append(Scored({t: credits.count("1") / n for t in ("a", "b")}, {t: credits for t in ("a", "b")}))
        return out

    return score, calls


def test_paired_gap_is_the_mean_paired_difference_with_its_standard_error():
    leader = Scored({"a": 0.6, "b": 0.5}, {"a": "11101", "b": "10101"})
    other = Scored({"a": 0.4, "b": 0.5}, {"a": "10100", "b": "01101"})
    weights = {"a": 0.5, "b": 0.25}
    gap, error = paired_gap(other, leader, weights)
    diffs = {"a": [0, -1, 0, 0, -1], "b": [-1, 1, 0, 0, 0]}
    expected_var = 0.0
    for t, d in diffs.items():
        mean = sum(d) / 5
        expected_var += weights[t] ** 2 * (sum((x - mean) ** 2 for x in d) / 4) / 5
    assert gap == pytest.approx(0.5 * (0.4 - 0.6) + 0.25 * 0.0)
    assert error == pytest.approx(math.sqrt(expected_var))
    assert paired_gap(other, leader, {"a": 0.5}) [1] == pytest.approx(0.5 * math.sqrt(0.3 / 5))


def test_racing_keeps_what_noise_cannot_separate_and_finds_the_better_on_more_data():
    """Rung 0 (10 examples): candidate 1 leads with 7, candidate 2 ties it, candidate 3 (the best on more data)
    has 6, one example apart: within noise, kept although halving keeps only 2 of 6; the others (2 of 10) are
    significantly below and dropped. On 30 examples candidate 3 wins. Scored by order alone, it is cut at rung 0."""
    leader = lambda j: j % 10 <= 6  # noqa: E731
    best = lambda j: j <= 5 or (j >= 10 and j != 29)  # noqa: E731
    poor = lambda j: j % 10 <= 1  # noqa: E731
    score, calls = _racer([leader, leader, best, poor, poor, poor])
    result = successive_halving(_pool(6), score, EXPERTS, min_examples=10, max_examples=30, eta=3, extend_edges=False)
    assert calls[0] == (0, 10, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert calls[1] == (1, 30, [0.1, 0.2, 0.3])
    assert result.winner.params == {"scaling": 0.3} and result.rungs_done == 2  # clear at 30: no extra rung

    def by_order(rung, examples, chosen):
        return [dict(s.accuracy) for s in score(rung, examples, chosen)]
    assert successive_halving(_pool(6), by_order, EXPERTS, min_examples=10, max_examples=30, eta=3,
                              extend_edges=False).winner.params == {"scaling": 0.1}


def test_a_close_call_at_the_last_rung_is_settled_on_more_examples():
    first = lambda j: j <= 6 or j >= 10  # noqa: E731  7 of the first 10, every later one
    second = lambda j: 3 <= j <= 9 or (j >= 10 and j % 2 == 0)  # noqa: E731  7 of 10, half of the later ones
    score, calls = _racer([second, first])
    result = successive_halving(_pool(2), score, EXPERTS, min_examples=10, max_examples=10, eta=3,
                                extend_edges=False)
    assert [(n, names) for _, n, names in calls] == [(10, [0.1, 0.2]), (30, [0.1, 0.2])]
    assert result.winner.params == {"scaling": 0.2} and result.rungs_done == result.rungs_planned == 2
    assert result.examples_scored == 2 * 10 + 2 * (30 - 10)  # the close call keeps the first 10 scored


def test_more_examples_are_asked_only_while_the_split_has_them():
    same = lambda j: j % 3 == 0  # noqa: E731
    score, calls = _racer([same, same], split_size=10)
    result = successive_halving(_pool(2), score, EXPERTS, min_examples=10, max_examples=10, eta=3,
                                extend_edges=False)
    assert [n for _, n, _ in calls] == [10, 30]  # the second rung found no more examples: identical, by order
    assert result.winner.params == {"scaling": 0.1}


def test_a_lower_confidence_keeps_fewer():
    leader = lambda j: j % 10 <= 6  # noqa: E731
    near = lambda j: j % 10 <= 5  # noqa: E731
    score, calls = _racer([leader, leader, near, near])
    successive_halving(_pool(4), score, EXPERTS, min_examples=10, max_examples=30, eta=3, confidence=0.6,
                       extend_edges=False)
    assert calls[1][2] == [0.1, 0.2]  # one example apart is significant at 60 %
    score, calls = _racer([leader, leader, near, near])
    successive_halving(_pool(4), score, EXPERTS, min_examples=10, max_examples=30, eta=3, extend_edges=False)
    assert calls[1][2] == [0.1, 0.2, 0.3, 0.4]


def test_a_winner_at_the_edge_of_its_grid_is_searched_past_it():
    """The best scaling is 0.8, the grid stops at 0.5: steps of the grid's spacing are tried past the edge, on the
    last rung's examples, while they score better; the first worse one ends it."""
    scorer = Scorer(lambda s: 1 - abs(s - 0.8))
    result = successive_halving(_pool(5), scorer, EXPERTS, min_examples=10, max_examples=30, eta=3)
    assert result.winner.params == {"scaling": 0.8}
    beyond = scorer.calls[2:]
    assert beyond == [(2, 30, [0.6]), (3, 30, [0.7]), (4, 30, [0.8]), (5, 30, [0.9])]
    rows = {row["candidate"]: row for row in result.leaderboard()}
    assert rows["task_arithmetic(scaling=0.8)"]["chosen"] == "yes" and "task_arithmetic(scaling=0.9)" in rows
    inside = Scorer(lambda s: 1 - abs(s - 0.3))
    assert successive_halving(_pool(5), inside, EXPERTS, min_examples=10, max_examples=30, eta=3).rungs_done == 2


def test_a_method_cut_short_by_its_grid_is_searched_past_it_even_when_another_leads():
    """Average leads the last rung (0.9); Task Arithmetic's best point there, 0.5, sits at its grid's edge and its
    optimum is 0.8 (1.0): stepping past the edge finds it, and it wins. Without the steps, average would."""
    quality = {"average": lambda p: 0.9, "task_arithmetic": lambda p: 1 - abs(p["scaling"] - 0.8)}
    calls = []

    def score(rung, examples, chosen):
        calls.append([c.name for c in chosen])
        return [{"a": 0.8 * quality[c.method](c.params), "b": 0.5 * quality[c.method](c.params)} for c in chosen]

    pool = [Candidate("average", {}), *_pool(5)]
    result = successive_halving(pool, score, EXPERTS, min_examples=10, max_examples=30, eta=3)
    assert result.winner == Candidate("task_arithmetic", {"scaling": 0.8})
    assert calls[-1] == ["task_arithmetic(scaling=0.9)"]  # the first step that does not beat 0.8 ends it
    assert successive_halving(pool, score, EXPERTS, min_examples=10, max_examples=30, eta=3,
                              extend_edges=False).winner == Candidate("average", {})


def test_the_next_value_follows_the_grid_spacing_and_its_bounds():
    from mergeflow.search import next_beyond

    assert next_beyond([0.3, 0.5, 0.7, 1.0], 1.0) == 1.3
    assert next_beyond([0.3, 0.5, 0.7, 1.0], 0.3) == 0.1
    assert next_beyond([0.3, 0.5, 0.7, 1.0], 0.5) is None
    assert next_beyond([1e-6, 1e-3], 1e-3) == 1.0  # a geometric grid grows geometrically
    assert next_beyond([2.0], 2.0) is None


def test_every_registered_method_is_searchable_from_the_grid_it_declares():
    from mergeflow.methods import METHODS
    from mergeflow.search import AUTO_GRIDS, candidates
    from mergeflow.sweep import DEFAULT_GRIDS

    for name, cls in METHODS.items():
        assert AUTO_GRIDS[name] == (cls.search_grid if cls.search_grid is not None else cls.sweep_grid), name
        assert candidates([name]), name  # named in search.methods, it joins the search
        if cls.sweep_grid is not None:
            assert DEFAULT_GRIDS[name] == cls.sweep_grid
    # the defaults the demo's results were measured with
    assert DEFAULT_GRIDS["ties"] == {"density": [0.1, 0.2, 0.5], "scaling": [0.3, 0.5, 0.7, 1.0]}
    assert DEFAULT_GRIDS["tsv"] == {"alpha": [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]} and AUTO_GRIDS["doge_ta"] == {
        "eta": [0.07, 0.15, 0.3]}
    default = {c.method for c in candidates()}  # unnamed: the catalogue that learns nothing, not mergekit's family
    assert default == {"average", "task_arithmetic", "ties", "dare", "tsv", "iso_c", "iso_cts", "wudi", "doge_ta",
                       "regmean", "fisher", "mats"}
