"""Load on a served deployment (issue 34; long: MERGEFLOW_LONG_TESTS=1): runs triggered at once on `mergeflow serve
--limit L`, each with its own merge coefficient, on a real stack. Every run completes exactly once, at most L run
at once (from the runs' state timestamps), and the store and MLflow hold one merged model and one finished parent
run per run. benchmarks/stack_load.py does the same with N=10 and prints the figures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("MERGEFLOW_LONG_TESTS") != "1",
                                 reason="takes several minutes: run with MERGEFLOW_LONG_TESTS=1")]


def test_runs_triggered_at_once_each_finish_once_within_the_limit(tmp_path):
    from stack_harness import Stack
    from stack_load import run_load

    stack = Stack(tmp_path / "stack")
    try:
        stack.up()
        result = run_load(stack, tmp_path, runs=4, limit=2, timeout=1800)
    finally:
        stack.down()  # every server by its recorded PID, even when the load failed
    assert result["flow_runs"] == 4 and result["states"] == {"COMPLETED": 4}, result
    assert result["lost"] == [] and result["duplicated"] == [] and result["foreign"] == [], result
    assert result["max_running"] <= 2, result
    assert result["merged_stored"] == 4 and result["half_written"] == [], result
    assert result["mlflow_parents"] == {"FINISHED": 4} and not result["mlflow_open"], result
    assert not result["mlflow_duplicated"] and result["ok"], result
