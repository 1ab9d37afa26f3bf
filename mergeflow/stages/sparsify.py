"""The sparsify stage: a data-free method's global pass over the experts (TIES: per-expert top-k thresholds and
the majority sign; DOGE TA: the selection and its thresholds), stored once per expert set and setting as
safetensors: each numeric list of the pass's state a float64 tensor (every Python float exactly), the rest
(names, signs, the method and its settings) in the file's metadata. (DARE's drop masks are regenerated from its
seed per tensor, bit for bit, where they are applied: nothing to store.)"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mergeflow.config import AUTO, MergeSpec
from mergeflow.stages.refs import ObjectRef, sparsify_uri
from mergeflow.stages.stage import Context, Located, Node, Stage
from mergeflow.stages.store import Store


def has_global_pass(spec: MergeSpec) -> bool:
    """Whether the method has a global pass to store (TIES, DOGE TA); Task Arithmetic, averaging, DARE, the
    per-layer subspace methods and those whose pass only reads names (mergekit's) have none: no stage for them."""
    from mergeflow.methods import method_class
    from mergeflow.methods.base import MergeMethod

    cls = method_class(spec.method) if spec.method != AUTO else None
    return cls is not None and cls.prepare is not MergeMethod.prepare and not cls.prepare_is_cheap


def pass_settings(spec: MergeSpec) -> dict[str, Any]:
    """The parameters the method's global pass reads (its defaults filled in; none without a pass): the stage's
    cache key, so every scaling of one TIES density, or every DOGE eta, shares one stored pass."""
    from mergeflow.methods import build_method

    method = build_method(spec.method, spec.params)
    if not has_global_pass(spec):
        return {}
    params = method.params.model_dump(mode="json")
    return params if method.prepare_params is None else {k: params[k] for k in method.prepare_params}


STATE_FILE = "state.safetensors"
FORMAT_VERSION = 2


def pass_location(spec: MergeSpec, base: ObjectRef, experts: Mapping[str, ObjectRef], root: str) -> str:
    """Where a merge's global pass is stored (keyed by the parameters it reads)."""
    return sparsify_uri(root, spec.method, {**pass_settings(spec), "format": FORMAT_VERSION}, base, experts)


def sparsify(spec: MergeSpec, base: ObjectRef, experts: Mapping[str, ObjectRef], store: Store,
             device: str = "auto") -> tuple[ObjectRef, bool]:
    """Stored as `sparsify/<method>-<fingerprint>/state.safetensors`, keyed by the base's and experts' digests and
    the params that pass reads, so a rerun or another scaling of the same density reuses it. Returns (its
    reference, whether it was reused)."""
    from mergeflow.methods import build_method

    method = build_method(spec.method, spec.params)
    read = pass_settings(spec)
    uri = pass_location(spec, base, experts, store.root)
    reused = store.exists(uri)

    def build(staged: Path) -> None:
        with store.expert_pool(base, experts, device) as pool:
            state = method.prepare(pool)
        write_state(state, staged / STATE_FILE, {"method": spec.method, "params": read})

    return store.publish_or_reuse(build, uri), reused


def _numeric_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def write_state(state: Mapping[str, Any], path: Path, about: Mapping[str, Any]) -> None:
    """A global pass's state as safetensors (see the module's docstring); `about` goes to the metadata too."""
    from mergeflow.checkpoints.safetensors_format import save_safetensors

    tensors = {key: torch.tensor(value, dtype=torch.float64) for key, value in state.items() if _numeric_list(value)}
    rest = {key: value for key, value in state.items() if key not in tensors}
    save_safetensors(tensors, path, {"state": json.dumps(rest), **{k: json.dumps(v) for k, v in about.items()}})


def read_state(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        state = json.loads(handle.metadata()["state"])
        state.update({key: handle.get_tensor(key).tolist() for key in handle.keys()})
    return state


def read_sparsified(ref: ObjectRef, store: Store) -> dict[str, Any]:
    """The method state a sparsify stage stored, after checking its digest."""
    return read_state(store.local_directory(ref) / STATE_FILE)


# ---------------------------------------------------------------------------------------- the plan's stages

def sparsifies(spec: MergeSpec) -> bool:
    """Whether a merge runs the sparsify stage: a data-free method with a global pass (data-aware and learned
    methods prepare on the pool they merge)."""
    from mergeflow.methods import method_class
    from mergeflow.stages.statistics import statistic_kinds

    return has_global_pass(spec) and not statistic_kinds([spec]) and not method_class(spec.method).needs_objective


def pass_key(spec: MergeSpec) -> str | None:
    """What identifies a merge's sparsify stage (None: it has none): points with equal keys share one."""
    if not sparsifies(spec):
        return None
    return json.dumps([spec.method, pass_settings(spec)], sort_keys=True)


def pass_of(spec: MergeSpec, ctx: Context) -> ObjectRef | None:
    """The stored pass a grid point or candidate reads (None: it has none), run once per key in this context."""
    key = pass_key(spec)
    if key is None:
        return None
    if key not in ctx.passes:
        ctx.passes[key] = sparsify(spec, ctx.base, ctx.experts, ctx.store, ctx.device)[0]
    return ctx.passes[key]


def pass_spec(node: Node, ctx: Context) -> MergeSpec | None:
    """The point a sparsify node's pass is of: a merge's own pass (`sparsify:<label>`) is of the point it merges
    (a swept or searched merge's choice), which may have no pass (None)."""
    label = node.id.removeprefix("sparsify:")
    if label not in ctx.labelled:
        return node.spec
    spec = ctx.spec_of(label)
    return spec if has_global_pass(spec) else None


def _where(node: Node, ctx: Context) -> Located:
    spec = pass_spec(node, ctx)
    if spec is None:
        return None
    uri = pass_location(spec, ctx.base, ctx.experts, ctx.store.root)
    return uri, lambda: ObjectRef(uri=uri, sha256="")


def _sparsify(node: Node, ctx: Context) -> ObjectRef | None:
    spec = pass_spec(node, ctx)
    if spec is None:
        return None
    if node.id.removeprefix("sparsify:") in ctx.labelled:  # a merge's own pass
        return sparsify(spec, ctx.base, ctx.experts, ctx.store, ctx.device)[0]
    return pass_of(spec, ctx)


STAGES = (Stage("sparsify", _where, _sparsify),)
