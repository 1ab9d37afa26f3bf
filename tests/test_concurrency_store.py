"""Concurrent runs on one store (issue 34): several processes publishing the same fingerprinted directory, on a real
S3 server (SeaweedFS) and on a local folder, publish it once (every one of them gets the same reference, never a
torn or mixed directory), a reader polling meanwhile never sees a partial one, and processes filling one content
cache lose none of each other's entries. Runs that finish together at the champion gate of a real `mlflow server`
promote the best one and keep every version registered. Last, two `mergeflow run` commands of one config at once
over a shared S3 store, MLflow server and Prefect server both complete."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from mergeflow.config import TrackingConfig

ROUNDS = 10
PUBLISHERS = 3
WEIGHTS = hashlib.sha256(b"weights").digest() * (2**20 // 32)  # 1 MiB, the same in every publisher
NAMES = {"weights.bin", "part.bin", "record.json"}


def _build(i: int, r: int):
    """A directory as a stage builds it: weights every run computes alike, and files that differ per run (a record
    with timings: here the publisher's number)."""
    def build(staged: Path) -> None:
        (staged / "weights.bin").write_bytes(WEIGHTS)
        (staged / "part.bin").write_bytes(f"publisher {i} round {r}\n".encode() * 20_000)
        (staged / "record.json").write_text(json.dumps({"publisher": i, "round": r}))
    return build


def _torn(path: Path, files: dict[str, str], r: int) -> str | None:
    """Why the directory read at `path` is not one publisher's whole output (None when it is)."""
    if set(files) != NAMES:
        return f"round {r}: files {sorted(files)}"
    record = json.loads((path / "record.json").read_text())
    expected = f"publisher {record['publisher']} round {r}\n".encode() * 20_000
    if (path / "part.bin").read_bytes() != expected or (path / "weights.bin").read_bytes() != WEIGHTS:
        return f"round {r}: part.bin or weights.bin is not from publisher {record['publisher']} (mixed)"
    return None


def _publisher(i: int, root: str, cache_dir: str, start, done, results) -> None:
    """Each round: publish the round's directory through `Store.publish_or_reuse` (as every stage does) at the same
    moment as the others, report the reference it got, then read it back through the shared content cache."""
    from mergeflow.content_cache import ContentCache
    from mergeflow.stages.store import Store

    store = Store(root, {}, ContentCache(Path(cache_dir)))
    for r in range(ROUNDS):
        start.wait()
        uri = f"{root}/race/{r}"
        try:
            ref = store.publish_or_reuse(_build(i, r), uri)
            path = store.local_directory(ref)
            results.put(("ref", r, ref.sha256, _torn(path, {p.name: "" for p in path.iterdir()}, r)))
        except Exception as exc:  # noqa: BLE001 - reported to the test
            results.put(("error", r, f"publisher {i}: {type(exc).__name__}: {exc}", None))
        with done.get_lock():
            done.value += 1


def _reader(root: str, cache_dir: str, start, done, results) -> None:
    """Each round: while the publishers run, read the directory whenever it is said to exist."""
    from mergeflow.content_cache import ContentCache
    from mergeflow.storage import exists, fetch_directory

    cache = ContentCache(Path(cache_dir))
    for r in range(ROUNDS):
        start.wait()
        uri, reads = f"{root}/race/{r}", 0
        while True:
            finished = done.value >= PUBLISHERS * (r + 1)
            try:
                if exists(uri):
                    path, files = fetch_directory(uri, cache)
                    reads += 1
                    if problem := _torn(path, files, r):
                        results.put(("torn", r, problem, None))
            except Exception as exc:  # noqa: BLE001 - reported to the test
                results.put(("error", r, f"reader: {type(exc).__name__}: {exc}", None))
            if finished:
                break
        results.put(("reads", r, reads, None))


def _race(root: str, tmp_path: Path) -> list[tuple]:
    ctx = mp.get_context("fork")
    start, done, results = ctx.Barrier(PUBLISHERS + 1), ctx.Value("i", 0), ctx.Queue()
    cache = str(tmp_path / "shared-cache")  # one content cache for all: its entries are filled concurrently too
    workers = [ctx.Process(target=_publisher, args=(i, root, cache, start, done, results)) for i in range(PUBLISHERS)]
    workers.append(ctx.Process(target=_reader, args=(root, str(tmp_path / "reader-cache"), start, done, results)))
    for worker in workers:
        worker.start()
    try:
        found = [results.get(timeout=300) for _ in range(ROUNDS * (PUBLISHERS + 1))]
        for worker in workers:
            worker.join(timeout=60)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
    return found


def _check_race(found: list[tuple]) -> None:
    errors = [f"{kind}: {what}" for kind, _, what, _ in found if kind in ("error", "torn")]
    assert not errors, "\n".join(errors[:10])
    for r in range(ROUNDS):
        refs = {(digest, torn) for kind, round_, digest, torn in found if kind == "ref" and round_ == r}
        assert len(refs) == 1 and next(iter(refs))[1] is None, f"round {r}: publishers got {refs}"
    assert any(reads for kind, _, reads, _ in found if kind == "reads")  # the reader did read published ones


@pytest.mark.slow
def test_concurrent_publishers_on_s3_publish_once_and_readers_see_no_partial_directory(tmp_path, seaweed, s3_env):
    found = _race(f"s3://{s3_env}/store", tmp_path)
    _check_race(found)
    keys = [o["Key"] for o in seaweed.client().list_objects_v2(Bucket=s3_env).get("Contents", [])]
    assert not [k for k in keys if ".mergeflow-publishing-" in k or ".partial-" in k]
    assert len(keys) == ROUNDS * len(NAMES)


def test_concurrent_publishers_on_a_local_store_publish_once(tmp_path):
    _check_race(_race(str(tmp_path / "store"), tmp_path))
    assert sorted(p.name for p in (tmp_path / "store" / "race").iterdir()) == sorted(str(r) for r in range(ROUNDS))


def _fill(cache_dir: str, paths: list[str], start) -> None:
    from mergeflow.content_cache import ContentCache

    cache = ContentCache(Path(cache_dir))
    start.wait()
    for path in paths:
        cache.fetch(path)


def test_processes_filling_one_content_cache_lose_no_entry(tmp_path, monkeypatch):
    """Four processes remember the digests of 4 x 40 files in one cache at once (every file by two of them); then
    every digest is known: a fresh reader hashes nothing again."""
    import mergeflow.content_cache as content_cache

    files = []
    for i in range(160):
        path = tmp_path / "files" / f"f{i}.bin"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(os.urandom(64))
        files.append(str(path))
    ctx = mp.get_context("spawn")  # not fork: the suite's earlier tests leave threads a fork copies mid-lock
    start = ctx.Barrier(4)
    shares = [files[k * 40:(k + 1) * 40] + files[((k + 1) % 4) * 40:((k + 1) % 4) * 40 + 20] for k in range(4)]
    workers = [ctx.Process(target=_fill, args=(str(tmp_path / "cache"), share, start)) for share in shares]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0

    def no_hashing(path):
        raise AssertionError(f"{path}: its digest was lost from the cache by a concurrent writer")

    monkeypatch.setattr(content_cache, "sha256_file", no_hashing)
    cache = content_cache.ContentCache(tmp_path / "cache")
    for path in files:
        assert cache.fetch(path).sha256 == hashlib.sha256(Path(path).read_bytes()).hexdigest()


EXE = shutil.which("mergeflow", path=str(Path(sys.executable).parent)) or "mergeflow"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, seaweed_holder):
    """One `mlflow server` (SQLite, artifacts in a SeaweedFS bucket) for the module, stopped even if it fails."""
    from s3_server import MlflowServer

    seaweed = seaweed_holder.ensure()
    bucket = f"mlflow-{uuid.uuid4().hex[:12]}"
    seaweed.client().create_bucket(Bucket=bucket)
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"), seaweed, bucket)
    try:
        server.start()
        yield server
    finally:  # SIGTERM, and SIGKILL after 5 s (it can take 20 s to end with clients' connections open)
        if server.process is not None and server.process.poll() is None:
            os.killpg(server.process.pid, signal.SIGTERM)
            try:
                server.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(server.process.pid, signal.SIGKILL)
                server.process.wait()


GATE_ROUNDS, GATE_RUNS, MARGIN = 3, 3, 0.02


def _logged(tracker, parent: str, label: str, validation: float) -> dict[str, Any]:
    """A merge's record as `record_merge` returns it, with a logged model (no weights: the gate reads none)."""
    run_id = tracker.start_run(f"merge-{label}", parent_run_id=parent)
    model = tracker.client.create_logged_model(tracker.experiment_id, name=label, source_run_id=run_id)
    tracker.client.finalize_logged_model(model.model_id, "READY")
    return {"label": label, "run_id": run_id, "model_id": model.model_id,
            "selection": {"norm_acc.avg": validation, "acc.avg": validation}, "test": {"norm_acc.avg": 0.5}}


@pytest.mark.slow
def test_runs_finishing_together_promote_the_best_and_register_every_version(mlflow_server) -> None:
    """Round after round, threads register their run's best merge at the same moment (a new registered model, or
    one with a champion from an earlier night): every version stays registered with its decision, the decisions
    form one sequence, and the champion is the best-scoring version."""
    import tasks.record as record
    from tasks.tracking import MlflowTracker

    rng = random.Random(34)
    for r in range(GATE_ROUNDS):
        name = f"race-{r}"
        tracking = TrackingConfig(tracking_uri=mlflow_server.url, experiment="race", registered_model=name,
                                  promotion_margin=MARGIN)
        tracker = MlflowTracker(tracking)
        parent, initial = tracker.start_run(f"round-{r}"), None
        if r % 2:  # a champion from an earlier night, beaten by some of tonight's runs only
            initial = record.register_best.fn(tracking, parent, [_logged(tracker, parent, "earlier", 0.75)])["version"]
        scores = rng.sample([0.60, 0.70, 0.80, 0.90, 0.95, 0.65], GATE_RUNS)
        entries = [_logged(tracker, parent, f"run{k}", score) for k, score in enumerate(scores)]
        start, decisions, errors = threading.Barrier(GATE_RUNS), [], []

        def finish(entry: dict[str, Any]) -> None:
            start.wait()
            try:
                decisions.append(record.register_best.fn(tracking, parent, [entry]))
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=finish, args=(entry,)) for entry in entries]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert not errors, errors
        client = tracker.client
        versions = client.search_model_versions(f"name = '{name}'")
        assert len(versions) == GATE_RUNS + r % 2  # every run's version is registered, the losers' too
        assert all(v.tags.get("gate.promoted") in ("True", "False") for v in versions)
        best = max(entries, key=lambda e: e["selection"]["norm_acc.avg"])
        best_version = next(v.version for v in versions if v.tags["mergeflow.model_id"] == best["model_id"])
        champion = client.get_model_version_by_alias(name, "champion")
        assert champion.version == best_version, (
            f"round {r}: champion v{champion.version}, the best ({max(scores)}) is v{best_version}: "
            + ", ".join(f"{d['candidate_score']} vs {d['champion_score']} -> {d['promoted']}" for d in decisions))
        # one sequence: each promotion replaced the champion the one before it left, ending at today's champion;
        # no run was kept out by a champion it beats by more than the margin
        promoted = {d["champion_version"]: d["version"] for d in decisions if d["promoted"]}
        assert len(promoted) == sum(d["promoted"] for d in decisions), "one champion was replaced twice"
        current, steps = initial, 0
        while current in promoted:
            current, steps = promoted[current], steps + 1
        assert steps == len(promoted) and current == champion.version
        assert not any(d["candidate_score"] > d["champion_score"] + MARGIN for d in decisions if not d["promoted"])
        assert not client.search_registered_models(f"name = '{name}.gate-lock'")  # the gate's lock is released


def _merged(stdout: str) -> dict[str, str]:
    """{label: 'uri sha256-prefix'} from a run's 'Merged models' lines."""
    return dict(re.findall(r"^  (\S+): (s3://\S+\s+\(sha256 \w+)", stdout, re.MULTILINE))


@pytest.mark.slow
def test_two_runs_of_one_config_at_once_on_one_store_both_complete(tmp_path, seaweed, s3_env, mlflow_server,
                                                                     prefect_harness):
    """The nightly run and a run someone triggered, on one config, at the same time as two `mergeflow run`
    processes (each with its own local cache, as on two machines) over one S3 store, MLflow server and Prefect
    server: both complete, with the same stored merge; both versions registered, nothing half-published left."""
    from mlflow.tracking import MlflowClient
    from prefect.settings import PREFECT_API_URL

    raw = {
        "name": "overlap", "tasks": [{"name": "election"}, {"name": "rotten_tomatoes"}],
        "data": {"probe_per_class": 2, "train": 8, "validation": 4, "test": 8},
        "finetune": {"steps": 2, "batch_size": 4, "max_length": 16, "warmup_steps": 1},
        "evaluation": {"max_length": 16}, "merges": [{"method": "task_arithmetic"}],
        "storage": {"root": f"s3://{s3_env}/store"},
        "tracking": {"tracking_uri": mlflow_server.url, "experiment": "overlap", "registered_model": "overlap"},
        "device": "cpu",
    }
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "OMP_NUM_THREADS": "1",
           "MLFLOW_S3_ENDPOINT_URL": seaweed.endpoint}
    runs = []
    for k in range(2):
        config = tmp_path / f"run{k}.yaml"
        config.write_text(yaml.safe_dump({**raw, "storage": {**raw["storage"], "cache_dir": str(tmp_path / f"c{k}")}}))
        log = tmp_path / f"run{k}.log"
        runs.append((subprocess.Popen([EXE, "run", str(config)], cwd=tmp_path, env=env, stdout=open(log, "wb"),
                                      stderr=subprocess.STDOUT, start_new_session=True), log))
    try:
        for process, log in runs:
            process.wait(timeout=900)
    finally:
        for process, _ in runs:
            if process.poll() is None:
                os.killpg(process.pid, 9)
                process.wait()
    outputs = [log.read_text(errors="replace") for _, log in runs]
    for (process, _), out in zip(runs, outputs):
        assert process.returncode == 0, out[-4000:]
    assert _merged(outputs[0]) and _merged(outputs[0]) == _merged(outputs[1])  # the same stored merge, same digest
    keys = [o["Key"] for o in seaweed.client().list_objects_v2(Bucket=s3_env, Prefix="store/").get("Contents", [])]
    assert not [k for k in keys if ".mergeflow-publishing-" in k or ".partial-" in k]
    client = MlflowClient(mlflow_server.url)
    versions = client.search_model_versions("name = 'overlap'")
    assert len(versions) == 2 and all(v.tags.get("gate.promoted") in ("True", "False") for v in versions)
    assert client.get_model_version_by_alias("overlap", "champion").version in {v.version for v in versions}
