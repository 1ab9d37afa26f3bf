"""The sparsify stage: a data-free method's global pass over the experts (TIES: per-expert top-k thresholds and
the majority sign; DOGE TA: the selection and its thresholds), stored once per expert set and setting."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergeflow.config import AUTO, MergeSpec
from mergeflow.stages.refs import ObjectRef, sparsify_uri
from mergeflow.stages.store import Store


def has_global_pass(spec: MergeSpec) -> bool:
    """Whether the method has a global pass to store (TIES, DOGE TA); Task Arithmetic, averaging, DARE and the
    per-layer subspace methods have none, so the flow skips the stage for them."""
    from mergeflow.methods import method_class
    from mergeflow.methods.base import MergeMethod

    return spec.method != AUTO and method_class(spec.method).prepare is not MergeMethod.prepare


def pass_settings(spec: MergeSpec) -> dict[str, Any]:
    """The parameters the method's global pass reads (its defaults filled in; none without a pass): the stage's
    cache key, so every scaling of one TIES density, or every DOGE eta, shares one stored pass."""
    from mergeflow.methods import build_method

    method = build_method(spec.method, spec.params)
    if not has_global_pass(spec):
        return {}
    params = method.params.model_dump(mode="json")
    return params if method.prepare_params is None else {k: params[k] for k in method.prepare_params}


def sparsify(spec: MergeSpec, base: ObjectRef, experts: Mapping[str, ObjectRef], store: Store,
             device: str = "auto") -> tuple[ObjectRef, bool]:
    """Stored as `sparsify/<method>-<fingerprint>/state.json`, keyed by the base's and experts' digests and the
    params that pass reads, so a rerun or another scaling of the same density reuses it. Returns (its reference,
    whether it was reused)."""
    from mergeflow.methods import build_method

    method = build_method(spec.method, spec.params)
    read = pass_settings(spec)
    uri = sparsify_uri(store.root, spec.method, read, base, experts)
    reused = store.exists(uri)

    def build(staged: Path) -> None:
        with store.expert_pool(base, experts, device) as pool:
            state = method.prepare(pool)
        (staged / "state.json").write_text(json.dumps({"method": spec.method, "params": read, "state": state}))

    return store.publish_or_reuse(build, uri), reused


def read_sparsified(ref: ObjectRef, store: Store) -> dict[str, Any]:
    """The method state a sparsify stage stored, after checking its digest."""
    return json.loads((store.local_directory(ref) / "state.json").read_text())["state"]
