"""`mergeflow plan CONFIG`: the run's plan before anything runs: every stage, whether it is stored or will run, and
the time it is expected to take where the config's last successful run measured that kind of stage."""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


def measured_seconds(store: Any, run: str) -> dict[str, float]:
    """Mean seconds per stage kind, as the config's last successful run measured them ({} when none did)."""
    from mergeflow.stages.refs import last_success_uri

    uri = last_success_uri(store.root, run)
    if not store.exists(uri):
        return {}
    return {k: float(v) for k, v in (store.read_json(uri).get("stage_seconds") or {}).items()}


def describe(plan: Any, status: dict[str, str], seconds: dict[str, float]) -> str:
    from mergeflow.stages.plan_status import RUNS, STORED

    timed = [node for node in plan if node.timed]
    stored = sum(status[n.id] == STORED for n in timed)
    records = sum(status[n.id] == RUNS for n in timed)
    pending = [n for n in timed if status[n.id] != STORED]
    expected = sum(seconds.get(n.kind, 0.0) for n in pending)
    untimed = sum(n.kind not in seconds for n in pending)
    lines = [f"Plan of run {plan.run!r}: {len(timed)} stages; {stored} stored, {len(pending) - records} to run, "
             f"{records} records every run writes"
             + (f" (about {_clock(expected)} at the last run's stage times"
                + (f"; {untimed} of kinds it did not time)" if untimed else ")") if seconds else
                " (no earlier run of this config measured its stages)"), ""]
    width = max(len(n.kind) for n in plan)
    state_width = max(len(s) for s in status.values())
    for node in plan:
        state = status[node.id]
        cost = f"~{_clock(seconds[node.kind])}" if state not in (STORED, RUNS) and node.kind in seconds else ""
        lines.append(f"  {state:<{state_width}}  {node.kind:<{width}}  {node.id}"
                     + (f"  ({node.about})" if node.about else "") + (f"  {cost}" if cost else ""))
    kinds = Counter(n.kind for n in timed)
    lines += ["", "Stages per kind: " + ", ".join(f"{k} {v}" for k, v in kinds.items())]
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> int:
    from mergeflow.config import load_run_config
    from mergeflow.plan import compile_plan
    from mergeflow.stages.plan_status import plan_status
    from mergeflow.stages.store import Store

    config = load_run_config(args.config)
    plan = compile_plan(config)
    store = Store.of(config.storage)
    status = plan_status(config, plan, store)
    if args.format == "mermaid":
        print(plan.mermaid(status), end="")
    else:
        print(describe(plan, status, measured_seconds(store, config.name)))
    return 0
