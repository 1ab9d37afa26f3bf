"""The subspace stage: the per-layer factors the subspace methods read (`mergeflow.subspace`: each task vector's
top triplets, the summed task vector's SVD, DOGE's shared bases), computed once per expert set and kind and
stored sharded by layer group, so every merge, merge part and sweep point over those experts reads them instead
of recomputing an SVD."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from mergeflow.config import MergeSpec
from mergeflow.stages.refs import ObjectRef, subspace_uri
from mergeflow.stages.stage import Context, Located, Node, Stage
from mergeflow.stages.store import Store

if TYPE_CHECKING:
    from mergeflow.subspace import SubspaceReader


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


def build_subspace(kind: str, base: ObjectRef, experts: Mapping[str, ObjectRef], store: Store,
                   device: str = "auto", group_bytes: int = 256_000_000
                   ) -> tuple[ObjectRef, bool, dict[str, float]]:
    """Stored at `subspace/<kind>-<fingerprint>/` (keyed by the base's and experts' digests), in files of about
    `group_bytes` of consecutive layers; reused when there. Its digest is its index's, which records each file's.
    Returns (its reference, whether it was reused, {seconds, bytes})."""
    from mergeflow.subspace import INDEX, write_subspace

    uri = subspace_uri(store.root, kind, base, experts)
    reused = store.exists(uri)
    started = time.perf_counter()

    def build(staged: Path) -> None:
        with store.expert_pool(base, experts, device) as pool:
            write_subspace(pool, kind, staged, group_bytes=group_bytes, progress=True)

    ref = store.publish_or_reuse(build, uri, digest_of=INDEX)
    size = sum(f["bytes"] for f in store.subspace(ref).index["files"].values())
    return ref, reused, {"seconds": round(time.perf_counter() - started, 3), "bytes": float(size)}


def stored_subspaces(refs: Mapping[str, ObjectRef] | None, store: Store) -> dict[str, SubspaceReader]:
    """Readers (kind -> `SubspaceReader`) of stored subspaces: each index verified against its reference's digest
    now, each factor file fetched and verified when a merge (part) first reads a layer in it."""
    return {kind: store.subspace(ref) for kind, ref in (refs or {}).items()}


# ---------------------------------------------------------------------------------------- the plan's stages

def read_by(spec: MergeSpec, ctx: Context) -> dict[str, ObjectRef] | None:
    """The stored factors `spec` reads, by kind (None: it reads none)."""
    return {kind: ctx.value(f"subspace:{kind}") for kind in subspace_kinds([spec])} or None


def _where(node: Node, ctx: Context) -> Located:
    uri = subspace_uri(ctx.store.root, node.id.split(":", 1)[1], ctx.base, ctx.experts)
    return uri, lambda: ObjectRef(uri=uri, sha256="")


def _build(node: Node, ctx: Context) -> ObjectRef:
    return build_subspace(node.id.split(":", 1)[1], ctx.base, ctx.experts, ctx.store, ctx.device)[0]


STAGES = (Stage("build_subspace", _where, _build),)
