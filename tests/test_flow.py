"""The Prefect merge flow end to end on the real MiniLM and real data (tiny budgets), recorded in MLflow
(sqlite), with a local folder as object store; a rerun reuses the stored experts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow


def _config(tmp_path: Path, cache: Path):
    from mergeflow.config import RunConfig

    raw = {
        "name": "tiny",
        "tasks": [{"name": "election"}, {"name": "rotten_tomatoes"}],
        "data": {"probe_per_class": 2, "train": 16, "validation": 4, "test": 24},
        "finetune": {"steps": 3, "batch_size": 4, "max_length": 16, "warmup_steps": 1, "checkpoint_every": 1},
        "evaluation": {"max_length": 16},
        "merges": [{"method": "average"}, {"method": "task_arithmetic", "params": {"scaling": 0.5}},
                   {"method": "ties"}, {"method": "regmean"},
                   {"method": "adamerging", "params": {"granularity": "task", "steps": 2}},
                   {"method": "doge_ta", "params": {"steps": 5}},
                   {"method": "doge_am", "params": {"steps": 3, "am_steps": 2}},
                   {"method": "tsv"}, {"method": "iso_c", "params": {"alpha": 1.5}}],
        "statistics": {"max_examples": 4},
        "storage": {"root": str(tmp_path / "store"), "cache_dir": str(cache)},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "tiny",
                     "registered_model": "tiny-merged"},
        "device": "cpu",
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(raw))
    return RunConfig.model_validate(raw)


def test_flow_runs_end_to_end_and_reuses_experts(tmp_path, tmp_path_factory, prefect_harness, split_reads,
                                                 capsys):
    from mlflow.tracking import MlflowClient

    from flows.merge_flow import merge_flow
    from mergeflow.checkpoints import open_checkpoint

    reads = split_reads
    config = _config(tmp_path, tmp_path_factory.mktemp("cache"))
    from mergeflow.plan import compile_plan
    from mergeflow.stages.plan_status import RUNS, STORED, plan_status
    from mergeflow.stages.store import Store
    from mergeflow_app.cli import main
    from tasks.progress import CLOCK

    plan = compile_plan(config)
    before = plan_status(config, plan, Store.of(config.storage))
    assert before["pretrained"] == "to run" and STORED not in before.values()
    first = merge_flow(config)
    # the plan the flow compiled is what it ran: every stage of every kind, no more and no fewer
    assert {kind: len(times) for kind, times in CLOCK.done.items()} == plan.counts()
    # and after the run, `mergeflow plan` finds every stage's output stored where the stage put it
    after = plan_status(config, plan, Store.of(config.storage))
    assert {node: state for node, state in after.items() if state not in (STORED, RUNS)} == {}
    assert main(["plan", str(tmp_path / "tiny.yaml")]) == 0
    printed = capsys.readouterr().out
    records = len([n for n in plan if n.timed and after[n.id] == RUNS])  # records, the overlap check
    assert records == len([n for n in plan if n.kind in ("check_overlap", "record_merge", "mark_success")])
    assert f"{len([n for n in plan if n.timed]) - records} stored, 0 to run, {records} records" in printed

    assert set(first["accuracy"]) == {"pretrained", "expert:election", "expert:rotten_tomatoes", "average",
                                      "task_arithmetic", "ties", "regmean", "adamerging",
                                      "doge_ta", "doge_am", "tsv", "iso_c"}
    for row in first["accuracy"].values():
        assert set(row) == {"election", "rotten_tomatoes"} and all(0.0 <= v <= 1.0 for v in row.values())
    assert "| ties" in first["table"] and "norm. avg" in first["table"]
    for label, ref in first["merged"].items():
        ckpt = open_checkpoint(ref["uri"])
        assert ckpt.digest == ref["sha256"] and ckpt.metadata["merge_method"] == label
        inputs = json.loads(ckpt.metadata["inputs"])
        assert {i["uri"] for i in inputs if i["role"] == "expert"} == {e["uri"] for e in first["experts"].values()}

    client = MlflowClient(config.tracking.tracking_uri)
    parent = client.get_run(first["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["merges.2.method"] == "ties"
    assert "ties.acc.avg" in parent.data.metrics and "pretrained.acc.election" in parent.data.metrics
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_name = {r.info.run_name: r for r in children}
    evaluations = {name for name in by_name if name.startswith("evaluate-")}
    assert evaluations == {f"evaluate-{m}" for m in ("pretrained", "expert-election", "expert-rotten_tomatoes",
                                                      *first["merged"])} | {
        f"evaluate-{m}-validation" for m in ("expert-election", "expert-rotten_tomatoes", *first["merged"])}
    ties_eval = by_name["evaluate-ties"]
    assert ties_eval.data.metrics["acc.election"] == first["accuracy"]["ties"]["election"]
    assert sorted(i.tags[0].value for i in ties_eval.inputs.dataset_inputs) == ["evaluation", "evaluation", "model"]
    sparsify_runs = {name for name in by_name if name.startswith("sparsify-")}
    assert {name.rsplit("-", 1)[0] for name in sparsify_runs} == {"sparsify-ties", "sparsify-doge_ta"}
    ties_pass = next(by_name[name] for name in sparsify_runs if name.startswith("sparsify-ties-"))
    assert ties_pass.data.params["param.density"] == "0.2" and "/sparsify/ties-" in ties_pass.data.params["sparsify_uri"]
    assert set(by_name) - evaluations - sparsify_runs == {"expert-election", "expert-rotten_tomatoes", "merge-average", "merge-task_arithmetic",
                            "merge-ties", "merge-regmean", "merge-adamerging", "merge-doge_ta", "merge-doge_am",
                            "merge-tsv", "merge-iso_c", "subspace-shared-6", "subspace-task", "subspace-sum",
                            "subspace-shared-tasks",
                            "statistics-election",
                            "statistics-rotten_tomatoes"}
    regmean_inputs = {i.tags[0].value for i in by_name["merge-regmean"].inputs.dataset_inputs}
    assert "statistics" in regmean_inputs
    ties = by_name["merge-ties"]
    assert ties.data.params["param.density"] == "0.2" and "norm_acc.avg" in ties.data.metrics
    # the model card: in the merged output (no scores yet) and logged with the run, with the scores measured
    card = client.download_artifacts(ties.info.run_id, "README.md", str(tmp_path / "card"))
    text = Path(card).read_text()
    assert "tags:\n- merge\n- mergeflow" in text and first["merged"]["ties"]["sha256"] not in text
    assert f"| test | norm_acc.avg | {ties.data.metrics['norm_acc.avg']:.4g} |" in text
    assert "| validation | norm_acc.avg |" in text and "no equivalent of Mergeflow's `ties`" in text
    assert "## Scores" not in (Path(first["merged"]["ties"]["uri"].removeprefix("file://")) / "README.md").read_text()
    assert ties.data.tags["mergeflow.model_sha256"] == first["merged"]["ties"]["sha256"]
    models = {m.name: m for m in client.search_logged_models([parent.info.experiment_id])}
    assert set(models) == {"average", "task_arithmetic", "ties", "regmean", "adamerging", "doge_ta", "doge_am", "tsv",
                           "iso_c"}
    subspace = by_name["subspace-task"]
    assert subspace.data.params["kind"] == "task" and subspace.data.metrics["bytes"] > 0
    assert "/subspace/task-" in subspace.data.params["subspace_uri"]
    assert models["ties"].tags["mergeflow.sha256"] == first["merged"]["ties"]["sha256"]
    assert models["ties"].source_run_id == ties.info.run_id and str(models["ties"].status).endswith("READY")
    contexts = sorted(i.tags[0].value for i in ties.inputs.dataset_inputs)
    assert contexts == ["base", "evaluation", "evaluation", "expert", "expert"]
    regmean_meta = json.loads(open_checkpoint(first["merged"]["regmean"]["uri"]).metadata["inputs"])
    assert [i["role"] for i in regmean_meta].count("statistics") == 2
    # the registered model is chosen on validation scores: registration reads no test split, and the choice is
    # the best validation score, whatever the test scores say
    validation_reads = [(name, split) for name, split in reads if name.endswith("-validation")]
    assert len({name for name, _ in validation_reads}) == 2 + len(first["merged"])
    assert all(split == "validation" for _, split in validation_reads), validation_reads
    assert not [name for name, _ in reads if name.startswith("register")]
    registration = first["registration"]
    assert registration["promoted"] and registration["version"] == "1"
    assert registration["metric"] == "validation.norm_acc.avg"
    validation_scores = {m: by_name[f"merge-{m}"].data.metrics["validation.norm_acc.avg"] for m in first["merged"]}
    best = max(validation_scores, key=validation_scores.get)
    assert registration["method"] == best and registration["candidate_score"] == validation_scores[best]
    version = client.get_model_version("tiny-merged", "1")
    assert version.tags["mergeflow.selection_split"] == "validation"
    assert version.tags["mergeflow.selection_metric"] == "norm_acc.avg"
    assert float(version.tags["validation.norm_acc.avg"]) == validation_scores[best]
    assert float(version.tags["test.norm_acc.avg"]) == by_name[f"merge-{best}"].data.metrics["norm_acc.avg"]
    losses = client.get_metric_history(by_name["expert-election"].info.run_id, "train_loss")
    assert len(losses) == 3
    assert not (tmp_path / "store" / "checkpoints").exists() or not any((tmp_path / "store" / "checkpoints").iterdir())

    import anyio
    from prefect.client.orchestration import get_client

    async def artifacts():
        async with get_client() as prefect:
            return {a.key: a for a in await prefect.read_artifacts() if a.key}

    published = anyio.run(artifacts)
    assert {"tiny-accuracy", "tiny-summary"} <= set(published)
    assert "| ties" in published["tiny-summary"].data and "data:image/png;base64," in published["tiny-summary"].data

    second = merge_flow(config)  # unchanged inputs: stored experts are reused, merges give the same digests
    assert second["experts"] == first["experts"] and second["merged"] == first["merged"]
    reruns = client.search_runs([parent.info.experiment_id],
                                f"tags.mlflow.parentRunId = '{second['mlflow_run_id']}'")
    assert {r.data.tags["mergeflow.reused"] for r in reruns if r.info.run_name.startswith("expert-")} == {"true"}
    assert {r.data.tags["mergeflow.reused"] for r in reruns if r.info.run_name.startswith("subspace-")} == {"true"}
    assert second["registration"]["version"] == "2" and not second["registration"]["promoted"]
    assert str(client.get_model_version_by_alias("tiny-merged", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("tiny-merged", "candidate").version) == "2"

    from tasks.lineage import format_lineage, lineage, model_id_of, pull

    tree = lineage(config.tracking.tracking_uri, "tiny-merged@champion")
    experts = [i for i in tree["inputs"] if i["context"] == "expert"]
    assert {e["sha256"] for e in experts} == {e["sha256"] for e in first["experts"].values()}
    assert all(e["training_run"]["name"].startswith("expert-") for e in experts)
    text = format_lineage(tree)
    assert "tiny-merged v1" in text and "champion" in text and "trained by run expert-election" in text

    pulled = pull(config.tracking.tracking_uri, "tiny-merged@champion", tmp_path / "pulled")
    assert open_checkpoint(str(pulled)).digest == first["merged"][best]["sha256"]
    model = client.get_logged_model(model_id_of(client.get_model_version_by_alias("tiny-merged", "champion")))
    stored = Path(model.artifact_location.removeprefix("file://")) / "model.safetensors"
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF  # a flipped byte in the artifact store
    stored.write_bytes(bytes(data))
    from mergeflow.errors import IntegrityError

    with pytest.raises(IntegrityError, match="model.safetensors has sha256"):
        pull(config.tracking.tracking_uri, "tiny-merged@champion", tmp_path / "pulled-again")
    assert not (tmp_path / "pulled-again").exists()
    data[-1] ^= 0xFF
    stored.write_bytes(bytes(data))
    (stored.parent / "extra.pkl").write_bytes(b"not listed anywhere")  # a file slipped into the artifacts
    with pytest.raises(IntegrityError, match="files its manifest does not list: extra.pkl"):
        pull(config.tracking.tracking_uri, "tiny-merged@champion", tmp_path / "pulled-again")
    (stored.parent / "extra.pkl").unlink()
    manifest = stored.parent / "mergeflow.json"  # a manifest rewritten to match altered weights
    manifest.write_text(manifest.read_text().replace('"files"', '"files" ', 1))
    with pytest.raises(IntegrityError, match="mergeflow.json has sha256 .* MLflow recorded"):
        pull(config.tracking.tracking_uri, "tiny-merged@champion", tmp_path / "pulled-again")
    assert not (tmp_path / "pulled-again").exists()
