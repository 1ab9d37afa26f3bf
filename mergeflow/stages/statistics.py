"""The statistics stage: per-expert statistics (Gram matrices, Fisher diagonals, K-FAC factors) on its task's
data, for the data-aware methods among a run's merges."""

from __future__ import annotations

import time
from typing import Any

from mergeflow.config import MergeSpec, StatisticsConfig
from mergeflow.stages.refs import ObjectRef, family_of, statistics_uri
from mergeflow.stages.stage import Context, Located, Node, Stage
from mergeflow.stages.store import Store


def statistic_kinds(specs: list[MergeSpec]) -> tuple[str, ...]:
    """The statistic kinds the data-aware methods among `specs` (and the candidates of `auto`) need (empty when
    none is data-aware)."""
    from mergeflow.methods import build_method
    from mergeflow.methods.data_aware import DataAwareMethod
    from mergeflow.statistics import KINDS

    wanted: set[str] = set()
    for spec in (one for given in specs for one in given.searched()):
        method = build_method(spec.method, spec.params)
        if isinstance(method, DataAwareMethod):
            wanted.update(method.statistic_kinds())
    return tuple(k for k in KINDS if k in wanted)


def statistics_location(expert: ObjectRef, dataset: ObjectRef, head: ObjectRef, kinds: tuple[str, ...],
                        settings: StatisticsConfig) -> str:
    """Where an expert's statistics of these kinds and settings are stored (beside the expert)."""
    return statistics_uri(expert, dataset, head, kinds, settings.model_dump())


def compute_statistics(task: str, base: ObjectRef, expert: ObjectRef, dataset: ObjectRef, head: ObjectRef,
                       kinds: tuple[str, ...], settings: StatisticsConfig, store: Store,
                       device: str = "auto") -> tuple[ObjectRef, dict[str, Any]]:
    """Per-expert statistics on its task's data, stored beside the expert checkpoint and reused when the expert,
    data, head and settings are unchanged. Returns the reference and a report (examples, seconds, reused)."""
    from mergeflow.statistics import save_statistics

    uri = statistics_location(expert, dataset, head, kinds, settings)
    if store.exists(uri):
        return store.file_ref(uri), {"reused": True}
    started = time.perf_counter()
    data = store.read_task(task, dataset, base, [settings.split])
    model = store.load_model(base, expert, device)
    stats = family_of(base).statistics(model, store.load_head(head, base), data.splits[settings.split], kinds,
                                       settings)
    stats.metadata.update({"task": task, "expert_sha256": expert.sha256, "dataset_sha256": dataset.sha256})
    store.publish_file(uri, lambda path: save_statistics(stats, path))
    report = {"reused": False, "examples": int(stats.metadata["examples"]),
              "seconds": round(time.perf_counter() - started, 2)}
    return store.file_ref(uri), report


# ---------------------------------------------------------------------------------------- the plan's stages

def read_by(spec: MergeSpec | None, ctx: Context) -> dict[str, ObjectRef] | None:
    """The experts' statistics `spec` reads (None: it reads none)."""
    if spec is None or not statistic_kinds([spec]):
        return None
    return {n: ctx.value(f"statistics:{n}") for n in ctx.task_configs}


def _where(node: Node, ctx: Context) -> Located:
    n = node.task
    uri = statistics_location(ctx.value(f"expert:{n}"), ctx.value(f"dataset:{n}"), ctx.value(f"head:{n}"),
                              statistic_kinds(ctx.config.merges), ctx.config.statistics)
    return uri, lambda: ctx.store.file_ref(uri)


def _compute(node: Node, ctx: Context) -> ObjectRef:
    n = node.task
    ref, report = compute_statistics(n, ctx.base, ctx.value(f"expert:{n}"), ctx.value(f"dataset:{n}"),
                                     ctx.value(f"head:{n}"), statistic_kinds(ctx.config.merges),
                                     ctx.config.statistics, ctx.store, ctx.device)
    print(f"statistics {n}: " + ("stored" if report["reused"] else f"{report['examples']} examples, "
                                                                   f"{report['seconds']} s"))
    return ref


STAGES = (Stage("compute_statistics", _where, _compute),)
