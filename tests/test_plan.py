"""The plan compiled from a run config: a closed graph of typed nodes, the stages the flow runs (the flow tests
check the counts against a real run, and the stored marks before and after it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergeflow.config import RunConfig, load_run_config
from mergeflow.plan import compile_plan

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_compiles_to_a_closed_graph(path):
    config = load_run_config(path)
    plan = compile_plan(config)
    ids = [node.id for node in plan]
    assert len(ids) == len(set(ids))
    seen: set[str] = set()
    for node in plan:  # inputs come first: the graph is in an order the flow can run
        assert set(node.inputs) <= seen, (node.id, set(node.inputs) - seen)
        seen.add(node.id)
    counts = plan.counts()
    assert counts["merge"] + counts.get("assemble_merge", 0) == len(config.merges) == counts["record_merge"]
    assert counts["prepare_dataset"] == counts["fit_head"] == len(config.tasks)
    mermaid = plan.mermaid()
    assert mermaid.startswith("flowchart LR\n") and mermaid.count(" --> ") == sum(len(n.inputs) for n in plan)


def _config(**changes) -> RunConfig:
    raw = {"name": "p", "tasks": [{"name": "election"}, {"name": "rotten_tomatoes"}],
           "merges": [{"method": "ties"}, {"method": "ties", "sweep": {"scaling": [0.3, 1.0]}},
                      {"method": "regmean"}, {"method": "tsv"}], "tracking": {"registered_model": "m"}}
    raw.update(changes)
    return RunConfig.model_validate(raw)


def test_the_plan_follows_the_flows_branching():
    plan = compile_plan(_config())
    kinds = {node.id: node.kind for node in plan}
    # TIES's global pass: one shared by the two sweep points (one density), one per TIES merge
    assert [node.about for node in plan if node.kind == "sparsify"] == ["ties(density=0.2)"] * 3
    assert kinds["statistics:election"] == "compute_statistics" and kinds["subspace:task"] == "build_subspace"
    assert "statistics:election" in plan.node("merge:regmean").inputs
    assert "subspace:task" in plan.node("merge:tsv").inputs and "select:ties-tuned" in plan.node(
        "merge:ties-tuned").inputs
    # registration reads validation scores of every merge; test scores only report
    assert {n.split for n in plan if n.id.startswith("evaluate:") and n.model and n.model.startswith("merge:")} == {
        "test", "validation"}
    assert set(plan.node("register").inputs) >= {"evaluate:ties-validation", "record:ties"}
    parted = compile_plan(_config(merge_parts=3, merges=[{"method": "tsv"}, {"method": "regmean"},
                                                         {"method": "adamerging"}]))
    assert parted.counts()["merge_part"] == 6 and parted.counts()["assemble_merge"] == 2
    assert parted.node("merge:adamerging").kind == "merge"  # a learned method runs whole, on the task data
    assert "dataset:election" in parted.node("merge:adamerging").inputs


def test_every_kind_a_plan_holds_has_its_executor_and_status_methods():
    """A node kind the flow's executor can run neither by a task of its own (`getattr(run, node.kind)`) nor by the
    generic stage task (its stage's `run`) fails here, not in a run; so does a stored output without a location
    for `mergeflow plan`. Search nodes are run by their search, not by the walk."""
    from flows.plan_run import PlanRun
    from mergeflow.plan import STAGES

    plans = [compile_plan(_config(skip_unchanged=True)),
             compile_plan(_config(merge_parts=2, merges=[{"method": "tsv"}, {"method": "adamerging"},
                                                          {"method": "auto", "search": {"methods": ["ties", "tsv"]}}])),
             *(compile_plan(load_run_config(path)) for path in CONFIGS)]
    walked = {node.kind for plan in plans for node in plan if node.part_of is None}
    assert {"check_unchanged", "merge_part", "assemble_merge", "record_search", "select_point", "check_overlap",
            "register_model", "compute_statistics", "build_subspace", "sparsify", "finetune_expert"} <= walked
    assert [kind for kind in walked if not callable(getattr(PlanRun, kind, None)) and STAGES[kind].run is None] == []
    unlocated = {node.kind for plan in plans for node in plan if node.stage.where is None}
    assert unlocated <= {"check_unchanged", "check_overlap", "select_point", "open_search", "record_search",
                         "merge_part", "record_merge", "register_model", "mark_success"}
    with pytest.raises(KeyError, match="no stage of kind 'fetch_expret'"):
        compile_plan(_config()).add("expert:x", "fetch_expret")
    for plan in plans:  # what the walk skips belongs to a search node the walk reaches later
        order = [node.id for node in plan]
        for node in plan:
            if node.part_of is not None:
                assert plan.node(node.part_of).kind == "record_search"
                assert order.index(node.part_of) > order.index(node.id)


def test_mergeflow_plan_prints_the_graph_before_anything_runs(tmp_path, capsys):
    import yaml

    from mergeflow_app.cli import main

    raw = _config(storage={"root": str(tmp_path / "store"), "cache_dir": str(tmp_path / "cache")}).model_dump(
        mode="json")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["plan", str(path)]) == 0
    text = capsys.readouterr().out
    assert "0 stored" in text and "to run" in text and "after pretrained" in text
    assert "no earlier run of this config measured its stages" in text
    assert main(["plan", str(path), "--format", "mermaid"]) == 0
    mermaid = capsys.readouterr().out
    assert mermaid.startswith("flowchart LR\n") and "class n0 torun" in mermaid
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.safetensors"))  # ran nothing
