"""`method: auto`'s statistics at the early rungs: a data-aware candidate reads statistics of the search's fidelity
share of the examples before the last rung; the full statistics are computed only when a data-aware candidate
reaches the last rung or wins (on the real MiniLM and real texts, through the command line's search)."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from mergeflow_app.cli import main
from test_merge_data import inputs, validation_only  # noqa: F401  (fixtures)


def _examples(uri: str) -> int:
    with safe_open(uri, "pt") as f:
        return int(f.metadata()["examples"])


@pytest.mark.parametrize("winner", ["task_arithmetic", "regmean"])
def test_early_rungs_read_a_share_of_the_statistics_and_only_a_data_aware_finalist_pays_the_full_ones(
        inputs, validation_only, tmp_path, capsys, monkeypatch, winner):  # noqa: F811
    import mergeflow.stages.statistics as statistics_stage
    import mergeflow.stages.sweep as sweep_stage

    root, base, experts, _ = inputs
    computed: list[tuple[str, float, str]] = []  # (task, share, uri) of each statistics stage run (stored or reused)
    compute = statistics_stage.compute_statistics

    def counted(task, *args, **kwargs):
        ref, report = compute(task, *args, **kwargs)
        computed.append((task, kwargs.get("share", 1.0), ref.uri))
        return ref, report

    read: list[tuple[str, int, tuple[str, ...] | None]] = []  # (method, examples, statistics read) per point

    def scored(method, params, base, experts, tasks, tuning, *args):  # `winner`'s points right on every example
        statistics = args[5]
        read.append((method, tuning.max_examples, tuple(r.uri for r in statistics.values()) if statistics else None))
        n = min(tuning.max_examples, 4)
        credit = [1 if method == winner else 0] * n
        return {"accuracy": {t: float(credit[0]) for t in tasks}, "correct": {t: credit for t in tasks}}, False

    monkeypatch.setattr(statistics_stage, "compute_statistics", counted)
    monkeypatch.setattr(sweep_stage, "sweep_point", scored)
    argv = ["merge", "--method", "auto", "--candidates", "task_arithmetic,regmean", "--base", base, "--out",
            str(tmp_path / "auto"), "--device", "cpu", "--tune", str(root / "data.yaml"), "--store",
            str(tmp_path / "s")]
    for expert in experts:
        argv += ["--expert", expert]
    assert main(argv) == 0
    out = capsys.readouterr().out

    cut = {task: uri for task, share, uri in computed if share == 0.1}
    full = {task: uri for task, share, uri in computed if share == 1.0}
    assert set(cut) == {"election", "rotten_tomatoes"} and len(computed) == len(cut) + len(full)
    assert all(_examples(uri) == 1 for uri in cut.values())  # ceil(0.1 x 3): the settings read 3 of 4
    regmean = [(examples, uris) for method, examples, uris in read if method == "regmean"]
    assert regmean[0][1] == tuple(cut.values())  # rung 0 reads the cut statistics
    assert "statistics 10%" in out  # the leaderboard says what the early rungs read
    manifest = json.loads((tmp_path / "auto" / "mergeflow.json").read_text())
    assert manifest["method"] == winner
    if winner == "task_arithmetic":  # every regmean point dropped at rung 0: the full statistics never computed
        assert full == {} and all(uris == tuple(cut.values()) for _, uris in regmean)
        assert not any(ref["role"] == "statistics" for ref in manifest["inputs"])
    else:  # the last rung and the winner's merge read the full statistics, computed once per expert
        assert len(computed) == 4 and set(full) == {"election", "rotten_tomatoes"}
        assert all(_examples(u) == 3 for u in full.values())
        assert regmean[-1][1] == tuple(full.values())
        merged_with = {ref["uri"] for ref in manifest["inputs"] if ref["role"] == "statistics"}
        assert merged_with == set(full.values())


def test_a_point_on_a_share_of_the_statistics_keeps_no_solver_state(tmp_path):
    """MaTS at an early rung solves on the cut statistics: its survivor, on the full ones, solves another problem,
    so the cut run keeps nothing to continue (a cut count on the full statistics still keeps its states)."""
    from types import SimpleNamespace

    from mergeflow.stages.refs import ObjectRef, statistics_uri
    from mergeflow.stages.sweep import warm_starts

    base, expert = ObjectRef(uri="s/base.safetensors", sha256="b"), ObjectRef(uri="s/a/model.safetensors", sha256="a")
    data, head = ObjectRef(uri="d", sha256="d"), ObjectRef(uri="h", sha256="h")
    store = SimpleNamespace(cache=SimpleNamespace(root=tmp_path))

    def kept(share: float) -> bool:
        uri = statistics_uri(expert, data, head, ("gram_in",), {"max_examples": 8}, share)
        stats = {"a": ObjectRef(uri=uri, sha256=f"stats-{share}")}
        return warm_starts("mats", {"max_iter": 25}, base, {"a": expert}, store, stats).keep

    assert statistics_uri(expert, data, head, ("gram_in",), {}, 0.25).endswith("-share0.25.safetensors")
    assert kept(1.0) and not kept(0.25)
