"""Registration decides on validation scores only: a merge that is best on test but not on validation is not the
candidate, and the champion gate compares validation scores."""

from __future__ import annotations

from typing import Any

from mergeflow.config import TrackingConfig


class RecordingTracker:
    """Stands in for MLflow: records what `register_best` asks to register."""

    calls: list[dict[str, Any]] = []

    def __init__(self, tracking: TrackingConfig) -> None:
        pass

    def register(self, name: str, model_id: str, run_id: str, score: float, *, metric: str, margin: float,
                 tags: dict[str, str] | None = None) -> dict[str, Any]:
        self.calls.append({"name": name, "model_id": model_id, "score": score, "metric": metric, "tags": tags})
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


def test_merges_without_validation_scores_are_not_registered(monkeypatch) -> None:
    import tasks.record as record

    monkeypatch.setattr(record, "MlflowTracker", RecordingTracker)
    RecordingTracker.calls.clear()
    tracking = TrackingConfig(tracking_uri="sqlite:///unused.db", registered_model="merged")
    unscored = {**_logged("test_only", 0.0, 0.99), "selection": {}}
    assert record.register_best.fn(tracking, "parent", [unscored]) is None
    assert not RecordingTracker.calls
