"""The subspace stage: the per-layer factors the subspace methods read (`mergeflow.subspace`: each task vector's
top triplets, the summed task vector's SVD, DOGE's shared bases), computed once per expert set and kind and
stored sharded by layer group, so every merge, merge part and sweep point over those experts reads them instead
of recomputing an SVD."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from mergeflow.config import MergeSpec
from mergeflow.stages.refs import ObjectRef, subspace_uri
from mergeflow.stages.store import Store


def subspace_kinds(specs: Iterable[MergeSpec]) -> list[str]:
    """The factor kinds the given merges (their sweep points, the candidates of `auto`) read, in first-use order."""
    from mergeflow.methods import build_method

    kinds: list[str] = []
    for spec in (one for given in specs for one in given.searched()):
        for params in spec.grid_points() or [spec.params]:
            for kind in build_method(spec.method, params).subspace_kinds():
                if kind not in kinds:
                    kinds.append(kind)
    return kinds


def spec_subspaces(spec: MergeSpec, built: Mapping[str, ObjectRef]) -> dict[str, ObjectRef]:
    """The built subspaces (kind -> reference) that one merge spec's method reads."""
    from mergeflow.methods import build_method

    return {kind: built[kind] for kind in build_method(spec.method, spec.params).subspace_kinds() if kind in built}


def build_subspace(kind: str, base: ObjectRef, experts: Mapping[str, ObjectRef], store: Store,
                   device: str = "auto") -> tuple[ObjectRef, bool, dict[str, float]]:
    """Stored at `subspace/<kind>-<fingerprint>/` (keyed by the base's and experts' digests); reused when there.
    Returns (its reference, whether it was reused, {seconds, bytes})."""
    from mergeflow.subspace import write_subspace

    uri = subspace_uri(store.root, kind, base, experts)
    reused = store.exists(uri)
    started = time.perf_counter()

    def build(staged: Path) -> None:
        with store.expert_pool(base, experts, device) as pool:
            write_subspace(pool, kind, staged, progress=True)

    ref = store.publish_or_reuse(build, uri)
    size = sum(p.stat().st_size for p in store.local_directory(ref).iterdir())
    return ref, reused, {"seconds": round(time.perf_counter() - started, 3), "bytes": float(size)}


def local_subspaces(refs: Mapping[str, ObjectRef] | None, store: Store) -> dict[str, Path]:
    """Local copies (kind -> directory) of stored subspaces, each verified against its reference's digest."""
    return {kind: store.local_directory(ref) for kind, ref in (refs or {}).items()}
