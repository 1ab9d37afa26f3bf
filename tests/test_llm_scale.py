"""benchmarks/llm_scale.py end to end at `--size tiny` on a real local stack (SeaweedFS, MLflow, Prefect): a
Llama-shaped base of 4.2 M parameters and four experts (two PEFT LoRA adapters, two full checkpoints) in S3, fetched,
merged (TA, TIES, a TA sweep), scored (perplexity of real text) and registered by `mergeflow run`; what the run
left in S3 and MLflow is read back directly while the stack is up, and the printed report is checked."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import llm_scale  # noqa: E402


@pytest.mark.slow
def test_the_tiny_llm_scale_run_stores_scores_and_registers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    seen: dict[str, Any] = {}

    def probe(env: dict[str, str], prefix: str) -> None:
        import boto3
        from mlflow.tracking import MlflowClient

        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket="mergeflow", Prefix=f"{prefix}/store/merged/")
        keys = {o["Key"] for page in pages for o in page.get("Contents", [])}
        manifests = sorted(k for k in keys if k.endswith("/mergeflow.json"))
        seen["merged"] = {}
        for key in manifests:
            folder = key.rsplit("/", 1)[0]
            record = json.loads(s3.get_object(Bucket="mergeflow", Key=key)["Body"].read())
            weights = sorted(k.rsplit("/", 1)[-1] for k in keys if k.startswith(folder + "/")
                             and k.endswith((".safetensors", ".index.json")))
            seen["merged"][folder.rsplit("/", 1)[-1]] = (record, weights)
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        seen["versions"] = client.search_model_versions("name='llm-scale-tiny'")

    code = llm_scale.run_scale("tiny", tmp_path / "scale", probe=probe)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "checks: all passed" in out

    # three merges (TA, TIES, the swept TA), each a complete model with a manifest naming the base and 4 experts
    labels = sorted(name.rsplit("-", 1)[0] for name in seen["merged"])
    assert labels == ["task_arithmetic", "task_arithmetic-tuned", "ties"], seen["merged"]
    for name, (record, weights) in seen["merged"].items():
        assert len(record["inputs"]) == 5, (name, record["inputs"])
        assert weights, name  # the merged weights themselves, beside the manifest
    assert [v.version for v in seen["versions"]] == ["1"]

    # per-stage times (every merge and evaluation), the whole run's peak RSS and the budget
    stages = {m[1]: int(m[2]) for m in re.finditer(r"^(\S+) \| (\d+) \| [\d.]+ \| [\d.]+$", out, re.MULTILINE)}
    assert stages["merge"] == 3 and stages["evaluate"] == 8 and stages["fetch"] == 5, stages
    peak = re.search(r"^whole run: ([\d.]+) s wall, peak RSS ([\d.]+) GB$", out, re.MULTILINE)
    assert peak and float(peak[1]) > 0 and 0.2 < float(peak[2]) < 8, out
    assert re.search(r"^budget \(engine window 0\.268 GB \+ one model 0\.008 GB\)", out, re.MULTILINE)
    assert "PROJECTION (not measured" in out

    # a finite perplexity per task for the pretrained model, every expert and every merge; merges differ
    ppl = {m[1]: dict((t, float(v)) for t, v in re.findall(r"(\w+) ([\d.]+)", m[2]))
           for m in re.finditer(r"^perplexity (\S+): (.+)$", out, re.MULTILINE)}
    assert set(ppl) == {"pretrained", "expert:reviews", "expert:tweets", "expert:news", "expert:forums",
                        "task_arithmetic", "ties", "task_arithmetic-tuned"}
    assert all(set(v) == {"reviews", "tweets", "news", "forums"} for v in ppl.values())
    assert all(math.isfinite(x) and x > 1 for v in ppl.values() for x in v.values())
    assert ppl["task_arithmetic"] != ppl["ties"] != ppl["pretrained"]
