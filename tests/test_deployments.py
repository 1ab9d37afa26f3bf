"""Nightly operation: the deployment files agree, "latest experts" picks the newest checkpoint, an unchanged
nightly run is skipped, and a deployment served against the real local stack (Prefect, MLflow, S3) runs a
triggered run with custom parameters to completion, with its results in MLflow and the bucket."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergeflow.checkpoints.safetensors_format import save_safetensors
from mergeflow.config import RunConfig, StorageConfig, load_run_config
from mergeflow.errors import ObjectNotFoundError

ROOT = Path(__file__).resolve().parents[1]


def test_the_ui_form_offers_the_causal_lm_family_and_a_lora_fine_tune():
    """The form of a custom run in the Prefect UI is the flow's parameter schema, as Prefect builds it."""
    from prefect.utilities.callables import parameter_schema

    from flows.merge_flow import merge_flow

    definitions = parameter_schema(merge_flow.fn).model_dump()["definitions"]
    family = definitions["ModelConfig"]["properties"]["family"]
    assert "causal_lm" in family["enum"] and "causal_lm" in family["description"]
    lora = definitions["FinetuneConfig"]["properties"]["lora"]
    assert {"$ref": "#/definitions/LoraConfig"} in lora["anyOf"] and "LoRA" in lora["description"]
    assert {"r", "alpha", "target_modules"} <= set(definitions["LoraConfig"]["properties"])


def test_prefect_yaml_deploys_the_nightly_config():
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    nightly = next(d for d in deployments if d["name"] == "nightly")
    assert nightly["parameters"]["config"] == yaml.safe_load((ROOT / "configs" / "nightly.yaml").read_text())
    config = load_run_config(ROOT / "configs" / "nightly.yaml")
    assert config.skip_unchanged and all(t.latest for t in config.tasks)
    schedule = nightly["schedules"][0]
    assert schedule["cron"] == "0 2 * * *" and schedule["timezone"]
    module, function = nightly["entrypoint"].split(":")
    assert (ROOT / module).is_file() and f"def {function}(" in (ROOT / module).read_text()


def test_prefect_yaml_and_the_built_deployments_declare_the_same_concurrency(prefect_harness):
    """What may run at once (issue 34): prefect.yaml's `concurrency_limit` (valid for Prefect's own schema) is what
    `mergeflow serve` / `mergeflow deploy` give the deployment by default, and what the Prefect server records."""
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import ConcurrencyLimitConfig

    from flows.deployments import deployment_options
    from flows.merge_flow import merge_flow
    from mergeflow_app.cli import build_parser

    nightly = next(d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
                   if d["name"] == "nightly")
    declared = ConcurrencyLimitConfig.model_validate(nightly["concurrency_limit"])
    assert declared.limit == 1 and declared.collision_strategy.value in ("ENQUEUE", "CANCEL_NEW")
    for command in ("serve", "deploy"):
        args = build_parser().parse_args([command, "configs/nightly.yaml"])
        assert (args.concurrency_limit, args.collision_strategy) == (declared.limit, declared.collision_strategy.value)
    schedule = nightly["schedules"][0]
    options = deployment_options(load_run_config(ROOT / "configs" / "nightly.yaml"), cron=schedule["cron"],
                                 timezone=schedule["timezone"])
    assert options["concurrency_limit"] == declared and options["parameters"] == nightly["parameters"]
    deployment_id = merge_flow.to_deployment(name="concurrency-check", **options).apply()

    async def registered():
        async with get_client() as client:
            return await client.read_deployment(deployment_id)

    stored = anyio.run(registered)
    assert stored.global_concurrency_limit.limit == declared.limit
    assert stored.concurrency_options.collision_strategy == declared.collision_strategy
    assert stored.schedules[0].schedule.cron == schedule["cron"]


def test_latest_checkpoint_is_the_newest_safetensors(tmp_path):
    from mergeflow.stages.fetch import latest_checkpoint
    from mergeflow.stages.store import Store

    storage = Store.of(StorageConfig(root=str(tmp_path)))
    prefix = tmp_path / "experts" / "election"
    with pytest.raises(ObjectNotFoundError, match="no \\*.safetensors"):
        latest_checkpoint(str(prefix), storage)
    (prefix / "v2").mkdir(parents=True)
    for i, name in enumerate(["v1.safetensors", "v2/model.safetensors", "statistics-x.safetensors", "notes.txt"]):
        (prefix / name).write_bytes(b"x")
        os.utime(prefix / name, (1_000 + 100 * i, 1_000 + 100 * i))
    assert latest_checkpoint(str(prefix), storage) == str(prefix / "v2" / "model.safetensors")
    os.utime(prefix / "v1.safetensors", (5_000, 5_000))
    assert latest_checkpoint(str(prefix), storage) == str(prefix / "v1.safetensors")


def _expert(base: dict, path: Path, seed: int, mtime: float) -> None:
    g = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors({k: v + 0.01 * v.abs().mean() * torch.randn(v.shape, generator=g) if v.is_floating_point()
                      else v for k, v in base.items()}, path, {"format": "pt"})
    os.utime(path, (mtime, mtime))


def test_unchanged_nightly_run_is_skipped(tmp_path, tmp_path_factory, prefect_harness):
    from flows.merge_flow import merge_flow
    from mergeflow.families.text.encoder import minilm_path

    base = load_file(str(minilm_path() / "model.safetensors"))
    experts = tmp_path / "experts"
    _expert(base, experts / "election" / "e1.safetensors", 1, 1_000)
    _expert(base, experts / "rotten_tomatoes" / "r1.safetensors", 2, 1_000)
    config = RunConfig.model_validate({
        "name": "nightly-test", "skip_unchanged": True,
        "tasks": [{"name": "election", "latest": str(experts / "election")},
                  {"name": "rotten_tomatoes", "latest": str(experts / "rotten_tomatoes")}],
        "data": {"probe_per_class": 2, "train": 4, "validation": 4, "test": 8},
        "evaluation": {"max_length": 16},
        "merges": [{"method": "task_arithmetic"}],
        "storage": {"root": str(tmp_path / "store"), "cache_dir": str(tmp_path_factory.mktemp("cache"))},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "nightly"},
        "device": "cpu",
    })
    first = merge_flow(config)
    assert not first.get("skipped") and first["experts"]["election"]["uri"].endswith("e1.safetensors")
    second = merge_flow(config)
    assert second["skipped"] and second["same_as"]["mlflow_run_id"] == first["mlflow_run_id"]
    from mlflow.tracking import MlflowClient

    skipped_run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(second["mlflow_run_id"])
    assert skipped_run.data.tags["mergeflow.skipped"] == "true" and skipped_run.info.status == "FINISHED"
    _expert(base, experts / "election" / "e2.safetensors", 3, 2_000)  # a newer election expert lands
    third = merge_flow(config)
    assert not third.get("skipped") and third["experts"]["election"]["uri"].endswith("e2.safetensors")
    assert third["experts"]["rotten_tomatoes"] == first["experts"]["rotten_tomatoes"]


def test_a_dataset_changed_in_place_is_not_skipped(tmp_path, tmp_path_factory, prefect_harness):
    """Same experts, same config, but the user's test data edited where it lies: the run must score it again."""
    import pyarrow.parquet as pq

    from flows.merge_flow import merge_flow
    from mergeflow.families.text.encoder import minilm_path
    from mergeflow.families.text.data import SplitSizes, TextTask, load_text_task, save_text_task

    base = load_file(str(minilm_path() / "model.safetensors"))
    _expert(base, tmp_path / "experts" / "tweets.safetensors", 1, 1_000)
    _expert(base, tmp_path / "experts" / "reviews.safetensors", 2, 1_000)
    task = load_text_task("election", cache_dir=tmp_path_factory.getbasetemp() / "wheels",
                          sizes=SplitSizes(probe_per_class=2, train=4, validation=4, test=8))
    dataset = tmp_path / "my-data" / "tweets"
    save_text_task(TextTask(name="tweets", class_names=task.class_names, splits=task.splits), dataset)
    config = RunConfig.model_validate({
        "name": "nightly-data", "skip_unchanged": True,
        "tasks": [{"name": "tweets", "dataset": str(dataset), "expert": str(tmp_path / "experts/tweets.safetensors")},
                  {"name": "rotten_tomatoes", "expert": str(tmp_path / "experts/reviews.safetensors")}],
        "data": {"probe_per_class": 2, "train": 4, "validation": 4, "test": 8},
        "evaluation": {"max_length": 16}, "merges": [{"method": "task_arithmetic"}],
        "storage": {"root": str(tmp_path / "store"), "cache_dir": str(tmp_path_factory.mktemp("cache"))},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "nightly-data"},
        "device": "cpu",
    })
    first = merge_flow(config)
    assert not first.get("skipped")
    assert merge_flow(config)["skipped"], "an unchanged run is skipped"
    table = pq.read_table(dataset / "test.parquet")
    flipped = [(label + 1) % len(task.class_names) for label in table.column("label").to_pylist()]
    pq.write_table(table.set_column(table.schema.get_field_index("label"), "label",
                                    pa_array(flipped, table.schema.field("label").type)), dataset / "test.parquet")
    third = merge_flow(config)
    assert not third.get("skipped"), "a dataset changed in place was skipped"
    assert third["experts"] == first["experts"]


def pa_array(values, type_):
    import pyarrow as pa

    return pa.array(values, type=type_)


@pytest.mark.slow
def test_served_deployment_runs_a_triggered_run_against_the_stack(tmp_path, monkeypatch):
    import anyio
    import boto3
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from mergeflow_app import stack

    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    from s3_server import stack_on_free_ports

    stack_config = stack_on_free_ports(tmp_path / "stack", bucket="nightly", startup_timeout=150)
    status = stack.up(stack_config)
    server = None
    try:
        env = status.env()
        raw = {
            "name": "served", "tasks": [{"name": "election"}, {"name": "rotten_tomatoes"}],
            "data": {"probe_per_class": 2, "train": 8, "validation": 4, "test": 8},
            "finetune": {"steps": 2, "batch_size": 4, "max_length": 16, "warmup_steps": 1},
            "evaluation": {"max_length": 16}, "merges": [{"method": "task_arithmetic"}],
            "storage": {"root": "s3://nightly/store", "cache_dir": str(tmp_path / "cache")},
            "tracking": {"tracking_uri": env["MLFLOW_TRACKING_URI"], "experiment": "served"}, "device": "cpu",
        }
        (tmp_path / "served.yaml").write_text(yaml.safe_dump(raw))
        server = subprocess.Popen(
            [sys.executable, "-m", "mergeflow_app.cli", "serve", str(tmp_path / "served.yaml"), "--name", "stacktest",
             "--cron", "0 3 * * *", "--timezone", "Europe/Berlin"],
            cwd=ROOT, env={**os.environ, **env, "PREFECT_HOME": str(tmp_path / "prefect-client")},
            stdout=open(tmp_path / "serve.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        custom = {**raw, "name": "triggered", "merges": [{"method": "task_arithmetic", "params": {"scaling": 0.5}}]}
        with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
            async def deployment():
                async with get_client() as client:
                    return await client.read_deployment_by_name("mergeflow-merge/stacktest")

            deadline = time.monotonic() + 120
            while True:
                try:
                    registered = anyio.run(deployment)
                    break
                except Exception:  # noqa: BLE001 - not registered yet
                    assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                    assert time.monotonic() < deadline, "deployment never registered"
                    time.sleep(1)
            assert registered.schedules[0].schedule.cron == "0 3 * * *"
            assert registered.schedules[0].schedule.timezone == "Europe/Berlin"
            run = run_deployment("mergeflow-merge/stacktest", parameters={"config": custom}, timeout=420)

            from prefect.client.schemas.actions import WorkPoolCreate

            from flows.deployments import deploy

            async def pool_and_deployment(deployment_id):
                async with get_client() as client:
                    if deployment_id is None:
                        return await client.create_work_pool(WorkPoolCreate(name="mergeflow-process", type="process"))
                    return await client.read_deployment(deployment_id)

            anyio.run(pool_and_deployment, None)
            pooled_raw = {**raw, "name": "pooled", "task_runner": "processes", "max_workers": 2}
            deployment_id = deploy(RunConfig.model_validate(pooled_raw), name="pooled", pool="mergeflow-process",
                                   cron="30 1 * * *", timezone="UTC")
            pooled = anyio.run(pool_and_deployment, deployment_id)
            assert pooled.work_pool_name == "mergeflow-process" and pooled.entrypoint == "flows/merge_flow.py:merge_flow"
            assert pooled.parameters["config"]["name"] == "pooled" and pooled.schedules[0].schedule.cron == "30 1 * * *"
            # a real worker on the process pool runs the registered deployment, on the config's task runner
            worker = subprocess.Popen(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", "mergeflow-process", "--type",
                 "process", "--limit", "1"], cwd=ROOT,
                env={**os.environ, **env, "PREFECT_HOME": str(tmp_path / "prefect-client")},
                stdout=open(tmp_path / "worker.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
            try:
                worker_run = run_deployment("mergeflow-merge/pooled", timeout=420)
            finally:  # cleanup: the worker's shutdown is not what this test checks (under the full suite's load a
                # Prefect process worker has taken over 30 s to end on SIGTERM after its run)
                os.killpg(worker.pid, 15)
                try:
                    worker.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(worker.pid, 9)
                    worker.wait(timeout=30)
            assert worker_run.state.is_completed(), (worker_run.state,
                                                      (tmp_path / "worker.log").read_text()[-3000:])
        assert run.state.is_completed(), (run.state, (tmp_path / "serve.log").read_text()[-3000:])
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        runs = client.search_runs([client.get_experiment_by_name("served").experiment_id],
                                  "attributes.run_name = 'triggered'")
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        assert runs[0].data.params["merges.0.params.scaling"] == "0.5"
        pooled_runs = client.search_runs([client.get_experiment_by_name("served").experiment_id],
                                         "attributes.run_name = 'pooled'")
        assert len(pooled_runs) == 1 and pooled_runs[0].info.status == "FINISHED"
        assert pooled_runs[0].data.tags["mergeflow.task_runner"] == "ProcessPoolTaskRunner(max_workers=2)"
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="nightly", Prefix="store/merged/triggered/")["Contents"]]
        assert any(k.endswith("model.safetensors") for k in keys)
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)
        stack.down(stack_config)
