"""Registration decides on validation scores only: a merge that is best on test but not on validation is not the
candidate, and the champion gate compares validation scores: in a real MLflow registry, a candidate replaces the
champion only when it beats it by more than `promotion_margin`."""

from __future__ import annotations

from typing import Any

import pytest

from mergeflow.config import TrackingConfig


class LockRegistry:
    """Stands in for the registry calls of the champion gate's lock (`tasks.record.gate_lock`)."""

    def __init__(self) -> None:
        self.models: dict[str, dict[str, str]] = {}

    def create_registered_model(self, name: str, tags: dict[str, str] | None = None, description: str = "") -> None:
        self.models[name] = dict(tags or {})

    def get_registered_model(self, name: str) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(tags=self.models[name])

    def delete_registered_model(self, name: str) -> None:
        del self.models[name]


class RecordingTracker:
    """Stands in for MLflow: records what `register_best` asks to register."""

    calls: list[dict[str, Any]] = []
    client = LockRegistry()

    def __init__(self, tracking: TrackingConfig) -> None:
        pass

    def register(self, name: str, model_id: str, run_id: str, score: float, *, metric: str, margin: float,
                 tags: dict[str, str] | None = None) -> dict[str, Any]:
        self.calls.append({"name": name, "model_id": model_id, "score": score, "metric": metric, "tags": tags,
                           "gate_locked": f"{name}.gate-lock" in self.client.models})
        return {"registered_model": name, "version": "1", "metric": metric, "candidate_score": score,
                "promoted": True}

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        pass


def _logged(label: str, validation: float, test: float) -> dict[str, Any]:
    return {"label": label, "run_id": f"run-{label}", "model_id": f"m-{label}",
            "selection": {"acc.avg": validation, "norm_acc.avg": validation},
            "test": {"acc.avg": test, "norm_acc.avg": test}}


def test_register_best_chooses_on_validation_not_test(monkeypatch) -> None:
    import tasks.record as record

    monkeypatch.setattr(record, "MlflowTracker", RecordingTracker)
    RecordingTracker.calls.clear()
    tracking = TrackingConfig(tracking_uri="sqlite:///unused.db", registered_model="merged")
    logged = [_logged("best_on_test", validation=0.80, test=0.97), _logged("best_on_validation", 0.90, 0.85)]
    decision = record.register_best.fn(tracking, "parent", logged)
    assert decision["method"] == "best_on_validation"
    (call,) = RecordingTracker.calls
    assert call["model_id"] == "m-best_on_validation" and call["score"] == 0.90
    assert call["metric"] == "validation.norm_acc.avg"
    assert call["tags"]["mergeflow.selection_split"] == "validation"
    assert call["tags"]["mergeflow.selection_metric"] == "norm_acc.avg"
    assert float(call["tags"]["test.norm_acc.avg"]) == 0.85
    assert call["gate_locked"] and not RecordingTracker.client.models  # decided holding the gate, then released


def test_merges_without_validation_scores_are_not_registered(monkeypatch) -> None:
    import tasks.record as record

    monkeypatch.setattr(record, "MlflowTracker", RecordingTracker)
    RecordingTracker.calls.clear()
    tracking = TrackingConfig(tracking_uri="sqlite:///unused.db", registered_model="merged")
    unscored = {**_logged("test_only", 0.0, 0.99), "selection": {}}
    assert record.register_best.fn(tracking, "parent", [unscored]) is None
    assert not RecordingTracker.calls


def _gate(tmp_path, margin: float):
    """A real MLflow registry (sqlite in `tmp_path`) and a `register(label, validation)` that logs a merged model
    in a child run and hands it to `register_best` alone, as a run with one merge does."""
    import tasks.record as record
    from tasks.tracking import MlflowTracker

    tracking = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="gate",
                              registered_model="merged", promotion_margin=margin)
    tracker = MlflowTracker(tracking)
    parent = tracker.start_run("gate")

    def register(label: str, validation: float) -> dict[str, Any]:
        run_id = tracker.start_run(f"merge-{label}", parent_run_id=parent)
        folder = tmp_path / label
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(label.encode())
        model_id = tracker.log_model(run_id, label, folder, {"method": label}, {}, {})
        logged = {**_logged(label, validation, test=0.5), "run_id": run_id, "model_id": model_id}
        return record.register_best.fn(tracking, parent, [logged])

    return register, tracker.client


def test_champion_gate_replaces_the_champion_with_a_candidate_better_by_more_than_the_margin(tmp_path) -> None:
    register, client = _gate(tmp_path, margin=0.02)
    first = register("first", 0.80)
    assert first["promoted"] and first["champion_version"] is None  # no champion yet: the first one is
    better = register("better", 0.85)  # 0.05 above the champion, margin 0.02
    assert better["promoted"] and better["champion_version"] == first["version"]
    assert better["champion_score"] == 0.80 and better["candidate_score"] == 0.85
    assert str(client.get_model_version_by_alias("merged", "champion").version) == better["version"]
    assert str(client.get_model_version_by_alias("merged", "candidate").version) == better["version"]


def test_champion_gate_keeps_the_champion_against_a_candidate_better_by_less_than_the_margin(tmp_path) -> None:
    register, client = _gate(tmp_path, margin=0.02)
    first = register("first", 0.80)
    close = register("close", 0.81)  # better, but by 0.01 < margin 0.02
    assert not close["promoted"] and close["champion_version"] == first["version"]
    worse = register("worse", 0.70)
    assert not worse["promoted"]
    assert str(client.get_model_version_by_alias("merged", "champion").version) == first["version"]
    assert str(client.get_model_version_by_alias("merged", "candidate").version) == worse["version"]
    tags = client.get_model_version("merged", close["version"]).tags
    assert tags["gate.promoted"] == "False" and tags["gate.margin"] == "0.02"


def test_the_merged_models_upload_prints_a_line_as_it_starts_and_as_it_ends(tmp_path, capsys, monkeypatch) -> None:
    """Logging a merged model (GBs at 1 B parameters, minutes of upload) prints the model, its size and where it
    goes as the upload starts, and its seconds and MB/s as it ends; the sizes are those of the files that arrive."""
    import re
    import time
    from pathlib import Path

    import tasks.record as record
    from tasks.tracking import MlflowTracker

    tracking = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="upload",
                              registered_model="merged")
    tracker = MlflowTracker(tracking)
    parent = tracker.start_run("upload")
    run_id = tracker.start_run("merge-ta", parent_run_id=parent)
    sizes = {"model-00001-of-00002.safetensors": 3_000_000, "model-00002-of-00002.safetensors": 1_234_567,
             "config.json": 321, "tokenizer/tokenizer.json": 4_096}
    folder = tmp_path / "ta"
    for name, size in sizes.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(bytes(size))
    upload = tracker.client.raw.log_model_artifacts

    def slow_upload(*args: Any, **kwargs: Any) -> None:  # long enough to read the rate back from the line
        upload(*args, **kwargs)
        time.sleep(0.5)

    monkeypatch.setattr(tracker.client.raw, "log_model_artifacts", slow_upload)
    model_id = tracker.log_model(run_id, "ta", folder, {"method": "ta"}, {}, {})
    out, total = capsys.readouterr().out, sum(sizes.values())
    started = re.search(r"^\[\d+:\d\d\] upload merged model 'ta': ([\d.]+) GB \(([\d,]+) bytes, (\d+) files?\) "
                        r"to (\S+)$", out, re.M)
    ended = re.search(r"^\[\d+:\d\d\] uploaded merged model 'ta': ([\d.]+) GB in ([\d.]+) s \(([\d.]+) MB/s\)$",
                      out, re.M)
    assert started and ended and started.start() < ended.start(), out
    assert int(started[2].replace(",", "")) == total and int(started[3]) == len(sizes)
    assert float(started[1]) == float(ended[1]) == round(total / 1e9, 2)
    assert float(ended[2]) >= 0.5 and float(ended[3]) == pytest.approx(total / 1e6 / float(ended[2]), rel=0.15)
    destination = tracker.client.get_logged_model(model_id).artifact_location
    assert started[4] == destination
    landed = Path(destination.removeprefix("file://"))
    assert {p.relative_to(landed).as_posix(): p.stat().st_size for p in landed.rglob("*") if p.is_file()} == sizes
    logged = {**_logged("ta", 0.8, test=0.5), "run_id": run_id, "model_id": model_id}
    assert record.register_best.fn(tracking, parent, [logged])["version"] == "1"
