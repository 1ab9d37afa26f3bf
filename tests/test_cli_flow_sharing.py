"""One set of stages, two executors: `mergeflow merge --tune / --data` runs the flow's stages in process over the
flow's store, so a command-line run after a flow run on the same inputs computes nothing the flow stored (scores,
statistics, sparsify passes, updates), the flow after a command-line run reuses what that scored, and both write
the same merged tensors, bit for bit."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mergeflow.families.text.data import SplitSizes, TextSplit, load_text_task, save_text_task
from mergeflow.families.text.encoder import minilm_path
from mergeflow.heads import ClassificationHead

pytestmark = pytest.mark.slow

EVALUATION = {"batch_size": 2, "max_length": 16}
STATISTICS = {"max_examples": 3, "max_length": 16, "batch_size": 2}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """MiniLM as the base, two experts near it, two real tasks with their heads, as files a user brings."""
    root = tmp_path_factory.mktemp("shared")
    base = load_file(str(minilm_path() / "model.safetensors"))
    tasks = []
    for i, name in enumerate(("election", "rotten_tomatoes")):
        g = torch.Generator().manual_seed(i)
        expert = {k: v + 0.01 * v.abs().mean() * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                  for k, v in base.items()}
        save_file(expert, str(root / f"{name}.safetensors"))
        task = load_text_task(name, cache_dir=tmp_path_factory.getbasetemp() / "wheels",
                              sizes=SplitSizes(probe_per_class=1, train=2, validation=6, test=8))
        if name == "rotten_tomatoes":  # validation taken partly from the training examples, as users often do
            train, validation = task.splits["train"], task.splits["validation"]
            task.splits["validation"] = TextSplit(train.texts + validation.texts[2:],
                                                  train.labels + validation.labels[2:])
        save_text_task(task, root / name)
        head = ClassificationHead(torch.randn(len(task.class_names), 384, generator=g),
                                  torch.zeros(len(task.class_names)), 10.0)
        head.save(root / f"{name}-head.safetensors")
        tasks.append({"name": name, "expert": str(root / f"{name}.safetensors"), "dataset": str(root / name),
                      "head": str(root / f"{name}-head.safetensors")})
    data = {"model": str(minilm_path()), "tasks": [{k: t[k] for k in ("name", "dataset", "head")} for t in tasks],
            **EVALUATION, "statistics": STATISTICS}
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    return root, tasks


def _cli(root, tasks, store, method, out, *extra):
    from mergeflow_app.cli import main

    argv = ["merge", "--method", method, "--base", str(minilm_path() / "model.safetensors"), "--out", str(out),
            "--device", "cpu", "--store", str(store), *extra]
    for t in tasks:
        argv += ["--expert", t["expert"]]
    assert main(argv) == 0


def _tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_and_flow_share_every_stage_result(inputs, tmp_path, monkeypatch, prefect_harness):
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from flows.merge_flow import merge_flow
    from mergeflow.config import RunConfig

    root, tasks = inputs
    store, cache = tmp_path / "store", tmp_path / "cache"
    monkeypatch.setenv("MERGEFLOW_CACHE", str(cache))
    data = str(root / "data.yaml")
    printed = io.StringIO()  # (not capsys: Prefect's log handlers would keep its stream past the test)
    with contextlib.redirect_stdout(printed):
        _cli(root, tasks, store, "task_arithmetic", tmp_path / "ta", "--tune", data, "--grid", "scaling=0.2,1.0")
    warnings = [line for line in printed.getvalue().splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "rotten_tomatoes (2 of 6, 33%)" in warnings[0] and "election" not in warnings[0]
    assert "choice on validation examples the experts did not train on: rotten_tomatoes on 4 of its first 6" \
        in printed.getvalue()  # the --tune choice reads the other four

    config = RunConfig.model_validate({
        "name": "shared", "model": {"pretrained": str(minilm_path())}, "tasks": tasks, "evaluation": EVALUATION,
        "statistics": STATISTICS,
        "merges": [{"method": "task_arithmetic", "sweep": {"scaling": [0.2, 1.0]}},
                   {"method": "ties", "params": {"density": 0.5}, "sweep": {"scaling": [0.5, 1.0]}},
                   {"method": "regmean"}],
        "storage": {"root": str(store), "cache_dir": str(cache)},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "shared"}, "device": "cpu"})
    summary = merge_flow(config)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("shared").experiment_id])
    reused = {r.info.run_name: r.data.tags.get("mergeflow.reused") for r in runs}
    flow_run = next(r for r in runs if r.info.run_id == summary["mlflow_run_id"])
    assert flow_run.data.params["validation_overlap.rotten_tomatoes"] == "2/6"
    assert flow_run.data.params["validation_overlap.election"] == "0/6"
    assert flow_run.data.tags["mergeflow.validation_overlap"] == "rotten_tomatoes"
    # the flow after the command line: the points and expert scores the command line stored are read, not computed
    assert reused["sweep-task_arithmetic-tuned-0"] == reused["sweep-task_arithmetic-tuned-1"] == "true"
    assert reused["evaluate-expert-election-validation"] == reused["evaluate-expert-rotten_tomatoes-validation"] == "true"
    assert reused["sweep-ties-tuned-0"] == "false"  # the control: what the command line did not score is scored

    # the command line after the flow: any computation of a stored result fails the test
    import mergeflow.stages.evaluate as evaluate_stage
    import mergeflow.stages.sparsify as sparsify_stage
    import mergeflow.stages.sweep as sweep_stage
    import mergeflow.sweep as sweep
    from mergeflow.families import get_family

    def computed(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"recomputed {what}")
        return fail

    monkeypatch.setattr(evaluate_stage, "evaluate_model", computed("a validation score"))
    monkeypatch.setattr(sweep_stage, "score_model", computed("a sweep point's score"))
    monkeypatch.setattr(sweep, "scaled_update", computed("a sweep's update"))
    monkeypatch.setattr(sparsify_stage, "write_state", computed("a sparsify pass"))
    monkeypatch.setattr(type(get_family("hf_text")), "statistics", computed("an expert's statistics"))
    _cli(root, tasks, store, "ties", tmp_path / "ties", "--tune", data, "--grid", "scaling=0.5,1.0",
         "--param", "density=0.5")
    _cli(root, tasks, store, "regmean", tmp_path / "regmean", "--data", data)

    merged = {label: Path(ref["uri"]) for label, ref in summary["merged"].items()}
    assert _same(_tensors(tmp_path / "ta"), _tensors(merged["task_arithmetic-tuned"]))
    assert _same(_tensors(tmp_path / "ties"), _tensors(merged["ties-tuned"]))
    assert _same(_tensors(tmp_path / "regmean"), _tensors(merged["regmean"]))
