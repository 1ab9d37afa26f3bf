"""The merge flow against real servers: SeaweedFS as object store and an `mlflow server` (SQLite backend,
artifacts proxied to S3). Checks the lineage end to end and that credentials never leak into logs, MLflow
params/tags/artifacts or Prefect parameters."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture
def mlflow_server(tmp_path, seaweed, s3_env):
    from s3_server import MlflowServer

    server = MlflowServer(tmp_path, seaweed, s3_env)
    server.start()
    yield server
    server.stop()


def test_flow_on_s3_and_mlflow_server_records_lineage_without_leaking_credentials(
        tmp_path, seaweed, s3_env, mlflow_server, prefect_harness, capfd, monkeypatch):
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client

    from flows.merge_flow import merge_flow
    from mergeflow.config import RunConfig
    from tasks.lineage import lineage, pull

    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", seaweed.endpoint)
    config = RunConfig.model_validate({
        "name": "s3run",
        "tasks": [{"name": "election"}, {"name": "rotten_tomatoes"}],
        "data": {"probe_per_class": 2, "train": 16, "validation": 4, "test": 16},
        "finetune": {"steps": 2, "batch_size": 4, "max_length": 16, "warmup_steps": 1},
        "evaluation": {"max_length": 16},
        "merges": [{"method": "task_arithmetic"}, {"method": "ties"}],
        "storage": {"root": f"s3://{s3_env}/store", "cache_dir": str(tmp_path / "cache")},
        "tracking": {"tracking_uri": mlflow_server.url, "experiment": "s3run", "registered_model": "s3-merged"},
        "device": "cpu",
    })
    summary = merge_flow(config)

    client = seaweed.client()
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_env).get("Contents", [])}
    for ref in summary["merged"].values():
        prefix = ref["uri"].split(f"s3://{s3_env}/", 1)[1]
        assert f"{prefix}/model.safetensors" in keys and f"{prefix}/mergeflow.json" in keys
    assert any(k.startswith("mlflow/") and k.endswith("model.safetensors") for k in keys)  # proxied artifacts
    assert not [k for k in keys if ".partial-" in k]

    tree = lineage(mlflow_server.url, "s3-merged@champion")
    assert {i["uri"] for i in tree["inputs"] if i["context"] == "expert"} == {
        e["uri"] for e in summary["experts"].values()}
    pulled = pull(mlflow_server.url, "s3-merged@candidate", tmp_path / "pulled")
    assert (pulled / "model.safetensors").is_file()

    secret = seaweed.secret_key
    out, err = capfd.readouterr()
    assert secret not in out and secret not in err
    mlflow_client = MlflowClient(mlflow_server.url)
    experiment = mlflow_client.get_experiment_by_name("s3run")
    for run in mlflow_client.search_runs([experiment.experiment_id]):
        blob = repr(run.data.params) + repr(run.data.tags) + repr(run.inputs)
        assert secret not in blob and seaweed.access_key not in blob
    for key in keys:  # every object Mergeflow or MLflow wrote: weights, manifests, tables, summaries
        body = client.get_object(Bucket=s3_env, Key=key)["Body"].read()
        assert secret.encode() not in body, key

    import anyio

    async def flow_parameters() -> list[dict]:
        async with get_client() as prefect:
            runs = await prefect.read_flow_runs()
            return [r.parameters for r in runs]

    assert secret not in repr(anyio.run(flow_parameters))
