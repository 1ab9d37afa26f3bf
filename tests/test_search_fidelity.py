"""`method: auto`'s multi-fidelity: an iterative method's early rungs run a fraction of its step counts (one reduced
merge, cached under its own params), its survivors run the full counts at the last rung, as the plain merge's own
point (bit-identical), both executors score the same points, and the leaderboard shows each rung's counts."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from mergeflow.methods import METHODS
from mergeflow.search import Candidate, candidates, successive_halving

EXPERTS = {"a": 0.8, "b": 0.5}
ITERATIVE = {"wudi": ("steps",), "doge_ta": ("steps",), "doge_am": ("am_steps",), "adamerging": ("steps",),
             "mats": ("max_iter",)}
# each method's quality, whatever its step counts: WUDI 1.5 best, MaTS next, Task Arithmetic behind
QUALITY = {("wudi", 1.0): 0.80, ("wudi", 1.5): 0.95, ("mats", None): 0.90, ("task_arithmetic", 0.3): 0.70,
           ("task_arithmetic", 1.0): 0.50, ("doge_ta", 0.07): 0.85, ("wudi", 2.0): 0.60}


def _quality(point: Candidate) -> float:
    return QUALITY[(point.method, point.params.get("scaling", point.params.get("eta")))]


class Recorder:
    """A scorer that records the point it is given for each candidate at each rung (accuracy from `_quality`)."""

    def __init__(self):
        self.points: list[tuple[int, Candidate]] = []

    def __call__(self, rung, examples, chosen):
        self.points += [(rung, c) for c in chosen]
        return [{"a": 0.8 * _quality(c), "b": 0.5 * _quality(c)} for c in chosen]


def _pool() -> list[Candidate]:
    return candidates(["task_arithmetic", "wudi", "mats"], {"task_arithmetic": {"scaling": [0.3, 1.0]},
                                                            "wudi": {"scaling": [1.0, 1.5]}})


def test_each_iterative_method_declares_its_counts_and_cuts_them_by_the_rule():
    declared = {name: cls.fidelity for name, cls in METHODS.items() if cls.fidelity}
    assert declared == ITERATIVE
    for name, fields in declared.items():
        defaults = METHODS[name].Params()
        assert all(isinstance(getattr(defaults, f), int) for f in fields), name
    wudi, mats, doge_am = METHODS["wudi"], METHODS["mats"], METHODS["doge_am"]
    assert wudi.at_fidelity({"scaling": 1.5}, 0.25) == {"scaling": 1.5, "steps": 100}  # ceil(0.25 x 400)
    assert wudi.at_fidelity({"scaling": 1.5}, 0.1) == {"scaling": 1.5, "steps": 40}  # the default: ceil(0.1 x 400)
    assert wudi.at_fidelity({"scaling": 1.5, "steps": 30}, 0.25) == {"scaling": 1.5, "steps": 8}
    assert wudi.at_fidelity({"scaling": 1.5}, 1.0) == {"scaling": 1.5}  # full: the plain point, no key added
    assert mats.at_fidelity({}, 0.25) == {"max_iter": 25}
    assert doge_am.at_fidelity({}, 0.25) == {"am_steps": 250}  # its deltas' steps stay whole
    assert METHODS["adamerging"].at_fidelity({"steps": 1}, 0.25) == {"steps": 1}  # at least one step
    assert METHODS["task_arithmetic"].at_fidelity({"scaling": 0.3}, 0.25) == {"scaling": 0.3}
    assert wudi.fidelity_label({"scaling": 1.5, "steps": 100}, {"scaling": 1.5}) == "steps 100/400"
    assert doge_am.fidelity_label({"am_steps": 250}, {}) == "am_steps 250/1000"
    assert METHODS["ties"].fidelity_label({}, {}) == "full"


def test_early_rungs_run_fewer_steps_and_survivors_the_full_counts_at_the_last():
    scorer = Recorder()
    pool = _pool()
    result = successive_halving(pool, scorer, EXPERTS, min_examples=10, max_examples=90, eta=3)  # rungs 10, 30, 90
    at = {rung: [p for r, p in scorer.points if r == rung] for rung in range(4)}
    assert [p.name for p in at[0]] == ["task_arithmetic(scaling=0.3)", "task_arithmetic(scaling=1.0)",
                                       "wudi(scaling=1.0, steps=40)", "wudi(scaling=1.5, steps=40)",
                                       "mats(max_iter=10)"]
    assert [p.name for p in at[1]] == ["wudi(scaling=1.5, steps=40)", "mats(max_iter=10)"]
    assert at[2] == [Candidate("wudi", {"scaling": 1.5})]  # the last rung: the candidate itself, full counts
    assert at[3] == [Candidate("wudi", {"scaling": 2.0})]  # a step past the grid's edge: full counts too
    assert result.winner == Candidate("wudi", {"scaling": 1.5}) and result.rungs_done == 4

    rows = {row["candidate"]: row for row in result.leaderboard()}
    best = rows["wudi(scaling=1.5)"]
    assert [best[f"rung {r} fidelity"] for r in range(3)] == ["steps 40/400", "steps 40/400", "steps 400/400"]
    assert best["rung 2 (90/task)"] == pytest.approx(100 * (0.95 + 0.95) / 2) and best["chosen"] == "yes"
    assert rows["mats"]["rung 1 fidelity"] == "max_iter 10/100, statistics 10%"
    assert "rung 2 fidelity" not in rows["mats"]
    assert rows["wudi(scaling=2.0)"]["rung 3 fidelity"] == "steps 400/400"
    assert rows["task_arithmetic(scaling=0.3)"]["rung 0 fidelity"] == "full"
    assert [e.reduced for e in result.entries if e.candidate.name == "wudi(scaling=1.5)"] == [True, True, False]


def test_a_method_that_does_not_iterate_is_scored_as_itself_at_every_rung():
    scorer = Recorder()
    pool = [c for c in _pool() if c.method == "task_arithmetic"]
    successive_halving(pool, scorer, EXPERTS, min_examples=10, max_examples=90, eta=3, extend_edges=False)
    # the same point at every rung: each rung scores on from the examples of the one before
    assert [(r, p) for r, p in scorer.points] == [(0, pool[0]), (0, pool[1]), (1, replace(pool[0], resume_from=10)),
                                                  (2, replace(pool[0], resume_from=30))]
    full = Recorder()  # fidelity 1: every method at its full counts at every rung
    successive_halving(_pool(), full, EXPERTS, min_examples=10, max_examples=90, eta=3, fidelity=1.0)
    assert all(replace(point, resume_from=0) in _pool() or point.params == {"scaling": 2.0}
               for _, point in full.points)


def _spy(monkeypatch, module, name: str, steps_at: int, calls: list[int]) -> None:
    """Record the step count (positional argument `steps_at`) of every call to `module.name`."""
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args[steps_at])
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


def test_the_merges_behind_the_rungs_and_the_full_point_is_the_plain_merge(store_and_refs, monkeypatch, tmp_path):
    """Real merges through the sweep stage both executors score with (`sweep_weights`, cached): WUDI's Adam and
    DOGE TA's run 40 of 400 steps at rungs 0 and 1 (one reduced merge serves both), the survivor 400 at the last
    rung, continuing from the reduced merge's solver states (360 steps more), and its point is the plain merge's, bit
    for bit, under the plain merge's own cache key."""
    import mergeflow.methods.doge_ta as doge_ta
    import mergeflow.methods.wudi as wudi
    from mergeflow.merge import merge_checkpoints
    from mergeflow.stages.refs import base_weights
    from mergeflow.stages.sweep import cached_point, sweep_weights
    from factories import tiny_state_dict

    store, base, experts = store_and_refs
    wudi_steps, doge_steps = [], []
    _spy(monkeypatch, wudi, "wudi_gram", 1, wudi_steps)
    _spy(monkeypatch, doge_ta, "optimise_delta", 3, doge_steps)
    from mergeflow.warm_start import Resume

    resumed = []  # steps each WUDI Adam run found done (kept by an earlier, cut run)
    start = Resume.start

    def spied(self, steps):
        found = start(self, steps)
        if self.store.root.name.startswith("wudi-"):
            resumed.append(found[0] if found else 0)
        return found

    monkeypatch.setattr(Resume, "start", spied)

    def score(rung, examples, chosen):
        for c in chosen:
            sweep_weights(c.method, c.params, base, experts, store, "cpu")
        return [{"a": 0.8 * _quality(c), "b": 0.5 * _quality(c)} for c in chosen]

    pool = candidates(["wudi", "doge_ta"], {"wudi": {"scaling": [1.0, 1.5]}, "doge_ta": {"eta": [0.07]}})
    result = successive_halving(pool, score, EXPERTS, min_examples=10, max_examples=90, eta=3, extend_edges=False)
    assert result.winner == Candidate("wudi", {"scaling": 1.5})
    counted = (list(wudi_steps), list(doge_steps))  # before the plain merge below adds its own

    searched = cached_point("wudi", {"scaling": 1.5}, base, experts, store)
    reduced = cached_point("wudi", {"scaling": 1.5, "steps": 40}, base, experts, store)
    assert searched is not None and reduced is not None
    merge_checkpoints("wudi", base_weights(base), [r.uri for r in experts.values()], str(tmp_path / "plain"),
                      {"scaling": 1.5}, device="cpu")
    plain = load_file(str(tmp_path / "plain" / "model.safetensors"))
    assert set(searched) == set(plain)
    for name in plain:
        assert torch.equal(searched[name].to(plain[name].dtype), plain[name]), name
    assert not all(torch.equal(reduced[n].to(plain[n].dtype), plain[n]) for n in plain)  # the cut merge differs
    layers = sum(t.dim() == 2 and t.is_floating_point() for t in tiny_state_dict().values())  # one Adam run each
    assert counted[0] == [40] * layers + [400] * layers  # one cut update for both scalings, then the survivor's
    assert resumed[:2 * layers] == [0] * layers + [40] * layers  # the survivor continued from the cut run's states
    assert counted[1] and set(counted[1]) == {40}  # DOGE TA dropped at rung 0: never paid in full


def test_the_command_line_executor_scores_the_reduced_points(monkeypatch):
    from mergeflow.config import SearchConfig, TuningConfig
    from mergeflow.stages import search as search_stage

    scored: list[tuple[int, Candidate]] = []

    resumed: list[tuple[int, int]] = []

    def score(spec, examples, ctx, share=1.0, resume_from=0):  # the sweep-point stage, replaced
        point = Candidate(spec.method, dict(spec.params), share)
        scored.append((examples, point))
        resumed.append((examples, resume_from))
        return {"a": 0.8 * _quality(point), "b": 0.5 * _quality(point)}

    monkeypatch.setattr(search_stage, "score", score)
    settings = SearchConfig(methods=["wudi"], grids={"wudi": {"scaling": [1.0, 1.5]}})
    result = search_stage.search(settings, TuningConfig(max_examples=90), EXPERTS, None)
    assert scored[:2] == [(10, Candidate("wudi", {"scaling": 1.0, "steps": 40})),
                          (10, Candidate("wudi", {"scaling": 1.5, "steps": 40}))]
    assert (90, Candidate("wudi", {"scaling": 1.5})) in scored and result.winner == Candidate("wudi", {"scaling": 1.5})
    assert resumed[:3] == [(10, 0), (10, 0), (30, 10)]  # rung 1 scores on from rung 0's point; the last, new points
    assert (90, 0) in resumed
    scored.clear()
    search_stage.search(settings.model_copy(update={"fidelity": 0.5}), TuningConfig(max_examples=90), EXPERTS, None)
    assert scored[0] == (10, Candidate("wudi", {"scaling": 1.0, "steps": 200}))
    scored.clear()  # a data-aware candidate reads statistics of the same share of the examples before the last rung
    search_stage.search(SearchConfig(methods=["mats", "wudi"], grids={"wudi": {"scaling": [1.0, 1.5]}}),
                        TuningConfig(max_examples=90), EXPERTS, None)
    assert scored[0] == (10, Candidate("mats", {"max_iter": 10}, 0.1))


def test_the_flow_executor_and_its_plan_score_the_reduced_points(monkeypatch):
    import flows.selection as selection
    from mergeflow.config import MergeSpec, RunConfig
    from mergeflow.plan import compile_plan

    config = RunConfig.model_validate({
        "name": "f", "tasks": [{"name": "election"}, {"name": "rotten_tomatoes"}], "tuning": {"max_examples": 90},
        "merges": [{"method": "auto", "search": {"methods": ["wudi"], "grids": {"wudi": {"scaling": [1.0, 1.5]}}}}]})
    submitted: list[tuple[str, Candidate]] = []
    resumed: list[tuple[str, int]] = []
    recorded = {}

    def submit(label, i, method, params, *args):
        point = Candidate(method, dict(params))
        submitted.append((label, point))
        resumed.append((label, args[-1]))  # resume_from, the task's last argument
        return SimpleNamespace(result=lambda: {"a": 0.8 * _quality(point), "b": 0.5 * _quality(point)})

    def record(label, result, *args):
        recorded["result"] = result
        return {"method": result.winner.method, "params": result.winner.params}

    monkeypatch.setattr(selection, "sweep_point", SimpleNamespace(submit=submit))
    monkeypatch.setattr(selection, "open_search", lambda *args: "search-run")
    monkeypatch.setattr(selection, "record_search", record)
    run = SimpleNamespace(config=config, parent="parent", base=None, experts={}, tasks={},
                          subspaces=lambda point: None, pass_of=lambda point: None,
                          statistics=lambda point, share=1.0: None)
    chosen = selection.search(run, "auto", config.merges[0], EXPERTS)
    assert chosen == MergeSpec(method="wudi", params={"scaling": 1.5})
    assert [p for label, p in submitted if label == "auto-r0"] == [Candidate("wudi", {"scaling": 1.0, "steps": 40}),
                                                                  Candidate("wudi", {"scaling": 1.5, "steps": 40})]
    assert [p for label, p in submitted if label == "auto-r2"] == [Candidate("wudi", {"scaling": 1.5})]
    assert [r for label, r in resumed if label in ("auto-r1", "auto-r2")] == [10, 0]  # on from rung 0; a new point
    row = {r["candidate"]: r for r in recorded["result"].leaderboard()}["wudi(scaling=1.5)"]  # what MLflow logs
    assert row["rung 0 fidelity"] == "steps 40/400" and row["rung 2 fidelity"] == "steps 400/400"

    plan = compile_plan(config)  # the plan names the same points, so its stored marks find them
    rung0 = [n.spec.params for n in plan if n.id.startswith("search:auto:0:")]
    last = [n.spec.params for n in plan if n.id.startswith("search:auto:2:")]
    assert rung0 == [{"scaling": 1.0, "steps": 40}, {"scaling": 1.5, "steps": 40}] and last == [{"scaling": 1.0}]
