"""The statistics stage: per-expert statistics (Gram matrices, Fisher diagonals, K-FAC factors) on its task's
data, for the data-aware methods among a run's merges. An `auto` search's early rungs read statistics of a share of
the examples (`share`); statistics only a search reads are computed when a candidate first reads them, so the full
ones are paid only where a data-aware candidate reaches the last rung or wins."""

from __future__ import annotations

import math
import time
from dataclasses import fields
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
                        settings: StatisticsConfig, share: float = 1.0) -> str:
    """Where an expert's statistics of these kinds and settings (on `share` of their examples) are stored (beside
    the expert)."""
    return statistics_uri(expert, dataset, head, kinds, settings.model_dump(), share)


def split_size(split: Any) -> int:
    """Examples in a family's split (each split dataclass holds its per-example values first)."""
    return len(getattr(split, fields(split)[0].name))


def compute_statistics(task: str, base: ObjectRef, expert: ObjectRef, dataset: ObjectRef, head: ObjectRef,
                       kinds: tuple[str, ...], settings: StatisticsConfig, store: Store,
                       device: str = "auto", share: float = 1.0) -> tuple[ObjectRef, dict[str, Any]]:
    """Per-expert statistics on its task's data, stored beside the expert checkpoint and reused when the expert,
    data, head and settings are unchanged; `share` < 1: on the first ceil(share x n) of the n examples the settings
    read (an `auto` search's early rungs). Returns the reference and a report (examples, seconds, reused)."""
    from mergeflow.statistics import save_statistics

    uri = statistics_location(expert, dataset, head, kinds, settings, share)
    if store.exists(uri):
        return store.file_ref(uri), {"reused": True}
    started = time.perf_counter()
    data = store.read_task(task, dataset, base, [settings.split])
    split = data.splits[settings.split]
    if share < 1:
        settings = settings.model_copy(update={
            "max_examples": math.ceil(share * min(settings.max_examples, split_size(split)))})
    model = store.load_model(base, expert, device)
    stats = family_of(base).statistics(model, store.load_head(head, base), split, kinds, settings)
    stats.metadata.update({"task": task, "expert_sha256": expert.sha256, "dataset_sha256": dataset.sha256})
    store.publish_file(uri, lambda path: save_statistics(stats, path))
    report = {"reused": False, "examples": int(stats.metadata["examples"]),
              "seconds": round(time.perf_counter() - started, 2)}
    return store.file_ref(uri), report


# ---------------------------------------------------------------------------------------- the plan's stages

def node_id(task: str, share: float = 1.0) -> str:
    """The plan node of a task's statistics on `share` of the examples ("statistics:<task>", "...@0.1")."""
    return f"statistics:{task}" + (f"@{share:g}" if share < 1 else "")


def read_by(spec: MergeSpec | None, ctx: Context, share: float = 1.0) -> dict[str, ObjectRef] | None:
    """The experts' statistics `spec` reads, on `share` of the examples (None: it reads none). A running context
    computes statistics only a search reads when they are first read (`Context.value`)."""
    if spec is None or not statistic_kinds([spec]):
        return None
    return {n: ctx.value(node_id(n, share)) for n in ctx.task_configs}


def _where(node: Node, ctx: Context) -> Located:
    n = node.task
    uri = statistics_location(ctx.value(f"expert:{n}"), ctx.value(f"dataset:{n}"), ctx.value(f"head:{n}"),
                              statistic_kinds(ctx.config.merges), ctx.config.statistics, node.share or 1.0)
    return uri, lambda: ctx.store.file_ref(uri)


def _compute(node: Node, ctx: Context) -> ObjectRef:
    n = node.task
    ref, report = compute_statistics(n, ctx.base, ctx.value(f"expert:{n}"), ctx.value(f"dataset:{n}"),
                                     ctx.value(f"head:{n}"), statistic_kinds(ctx.config.merges),
                                     ctx.config.statistics, ctx.store, ctx.device, share=node.share or 1.0)
    print(f"statistics {n}: " + ("stored" if report["reused"] else f"{report['examples']} examples, "
                                                                   f"{report['seconds']} s"))
    return ref


STAGES = (Stage("compute_statistics", _where, _compute),)
