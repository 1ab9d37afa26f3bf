"""Sparsify, subspace and merge stages: a method's global pass (e.g. TIES top-k thresholds), the stored per-layer
factors of the subspace methods, then the streaming merge."""

from __future__ import annotations

import time
from typing import Any

from prefect import task

from mergeflow.stages import merge as merge_stage, sparsify as sparsify_stage, subspace as subspace_stage
from mergeflow.stages.refs import ObjectRef
from mergeflow.config import EvalConfig, MergeSpec, StorageConfig, TrackingConfig
from tasks import IO_RETRIES, TIMEOUTS, on_device_or_cpu
from tasks.credentials import store_for, uses_storage
from tasks.tracking import MlflowTracker


@task(name="sparsify", task_run_name="sparsify-{spec.method}", timeout_seconds=TIMEOUTS["merge"], **IO_RETRIES)
@uses_storage
def sparsify(spec: MergeSpec, base: ObjectRef, experts: dict[str, ObjectRef], storage: StorageConfig,
             device: str, tracking: TrackingConfig, parent_run_id: str) -> ObjectRef:
    """The method's global pass, stored and keyed by digests (`stages.sparsify`), an MLflow child run named after
    the stored object; returns its reference."""
    store = store_for(storage)
    started = time.perf_counter()
    ref, reused = on_device_or_cpu(lambda on: sparsify_stage.sparsify(spec, base, experts, store, on), device,
                                   f"sparsify {spec.method}")
    print(f"sparsify {spec.method}: {'reused' if reused else 'stored'} {ref.uri}")
    tracker = MlflowTracker(tracking)
    run_id = tracker.start_run("sparsify-" + ref.uri.rstrip("/").rsplit("/", 1)[-1], parent_run_id=parent_run_id,
                               tags={"mergeflow.stage": "sparsify", "mergeflow.method": spec.method,
                                     "mergeflow.reused": str(reused).lower()})
    tracker.log_params(run_id, {"method": spec.method, **{f"param.{k}": v for k, v in
                                                          sparsify_stage.pass_settings(spec).items()},
                                "sparsify_uri": ref.uri, "sparsify_sha256": ref.sha256})
    if not reused:
        tracker.log_metrics(run_id, {"seconds": round(time.perf_counter() - started, 3)})
    tracker.end_run(run_id)
    return ref


@task(name="subspace", task_run_name="subspace-{kind}", timeout_seconds=TIMEOUTS["merge"], **IO_RETRIES)
@uses_storage
def build_subspace(kind: str, base: ObjectRef, experts: dict[str, ObjectRef], storage: StorageConfig, device: str,
                   tracking: TrackingConfig, parent_run_id: str) -> ObjectRef:
    """The per-layer factors of `kind` for these experts, stored once and keyed by digests (`stages.subspace`);
    a child MLflow run with its time and size."""
    store = store_for(storage)
    ref, reused, report = on_device_or_cpu(
        lambda on: subspace_stage.build_subspace(kind, base, experts, store, on), device, f"subspace {kind}")
    print(f"subspace {kind}: {'reused' if reused else 'stored'} {ref.uri} ({report['bytes'] / 1e6:.1f} MB"
          + ("" if reused else f", {report['seconds']:.1f} s") + ")")
    tracker = MlflowTracker(tracking)
    run_id = tracker.start_run(f"subspace-{kind}", parent_run_id=parent_run_id,
                               tags={"mergeflow.stage": "subspace", "mergeflow.reused": str(reused).lower()})
    tracker.log_input_refs(run_id, [("base", "base", base.uri, base.sha256)] +
                           [(name, "expert", ref_.uri, ref_.sha256) for name, ref_ in experts.items()])
    tracker.log_params(run_id, {"kind": kind, "subspace_uri": ref.uri, "subspace_sha256": ref.sha256})
    tracker.log_metrics(run_id, {"bytes": report["bytes"], **({} if reused else {"seconds": report["seconds"]})})
    tracker.end_run(run_id)
    return ref


@task(name="merge", task_run_name="merge-{spec.method}", timeout_seconds=TIMEOUTS["merge"], **IO_RETRIES)
@uses_storage
def merge(spec: MergeSpec, base: ObjectRef, experts: dict[str, ObjectRef], out_uri: str,
          storage: StorageConfig, state: ObjectRef | None, device: str,
          statistics: dict[str, ObjectRef] | None = None,
          unlabeled: tuple[dict[str, tuple[ObjectRef, ObjectRef]], str, EvalConfig] | None = None,
          subspaces: dict[str, ObjectRef] | None = None) -> tuple[ObjectRef, dict[str, Any]]:
    """`unlabeled` = (task -> (dataset, head), split, evaluation settings) for methods that learn coefficients."""
    store = store_for(storage)
    def run(on: str):
        return merge_stage.merge_experts(spec, base, experts, out_uri, store, state, on, statistics, unlabeled,
                                         subspaces)

    return on_device_or_cpu(run, device, f"merge {spec.method}")


@task(name="merge-part", task_run_name="merge-{spec.method}-part-{index}", timeout_seconds=TIMEOUTS["merge"],
      **IO_RETRIES)
@uses_storage
def merge_part(spec: MergeSpec, base: ObjectRef, experts: dict[str, ObjectRef], out_uri: str,
               index: int, parts: int, storage: StorageConfig, state: ObjectRef | None, device: str,
               statistics: dict[str, ObjectRef] | None = None, subspaces: dict[str, ObjectRef] | None = None
               ) -> str:
    """One layer group of a merge split across tasks."""
    store = store_for(storage)
    return on_device_or_cpu(lambda on: merge_stage.merge_part(spec, base, experts, out_uri, index, parts, store, state,
                                                              on, statistics, subspaces),
                            device, f"merge {spec.method} part {index}")


@task(name="assemble-merge", task_run_name="assemble-{label}", timeout_seconds=TIMEOUTS["merge"], **IO_RETRIES)
@uses_storage
def assemble_merge(label: str, part_uris: list[str], out_uri: str, storage: StorageConfig
                   ) -> tuple[ObjectRef, dict[str, Any]]:
    store = store_for(storage)
    return merge_stage.assemble_merge(part_uris, out_uri, store)
