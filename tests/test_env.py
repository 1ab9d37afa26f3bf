"""`MERGEFLOW_*` waits and timeouts from the environment: a default when unset, an error naming a bad value."""

from __future__ import annotations

import pytest

from mergeflow import env
from mergeflow.errors import ConfigError


@pytest.mark.parametrize("raw,expected", [(None, 300.0), ("", 300.0), ("  ", 300.0), ("20", 20.0), ("0.5", 0.5),
                                          ("0", 0.0)])
def test_seconds_reads_a_number_or_the_default(monkeypatch, raw, expected):
    if raw is None:
        monkeypatch.delenv("MERGEFLOW_SOME_WAIT", raising=False)
    else:
        monkeypatch.setenv("MERGEFLOW_SOME_WAIT", raw)
    assert env.seconds("MERGEFLOW_SOME_WAIT", 300.0) == expected


@pytest.mark.parametrize("raw", ["ten", "-5", "nan", "5s"])
def test_a_bad_value_names_the_variable(monkeypatch, raw):
    monkeypatch.setenv("MERGEFLOW_SOME_WAIT", raw)
    with pytest.raises(ConfigError, match=f"MERGEFLOW_SOME_WAIT={raw!r}: expected a number of seconds"):
        env.seconds("MERGEFLOW_SOME_WAIT", 300.0)


def test_the_waits_read_their_variables(monkeypatch):
    from mergeflow_app import prefect_server
    from tasks import tracking

    monkeypatch.setenv("MERGEFLOW_MLFLOW_WAIT", "12")
    monkeypatch.setenv("MERGEFLOW_PREFECT_WAIT", "34")
    monkeypatch.setenv("MERGEFLOW_PREFECT_STARTUP_TIMEOUT", "56")
    assert (tracking.wait_seconds(), prefect_server.lost_server_wait(), prefect_server.startup_timeout()) == (12, 34, 56)
