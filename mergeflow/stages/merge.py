"""Merge stages: one method over the experts into a stored checkpoint (whole, or layer group by layer group and
then assembled), with the sparsify stage's state, the experts' statistics or an unlabeled objective as the method
needs; and the merge of one ATM round."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mergeflow.config import AUTO, MergeSpec
from mergeflow.stages import statistics as statistics_stage, subspace as subspace_stage
from mergeflow.stages.refs import ObjectRef, TaskInputs, merged_uri, part_uri, parts_prefix
from mergeflow.stages.sparsify import read_sparsified
from mergeflow.stages.stage import Context, Located, Node, Stage
from mergeflow.stages.store import Store
from mergeflow.stages.subspace import stored_subspaces
from mergeflow.stages.sweep import Unlabeled, cached_point, unlabeled_objective
from mergeflow.storage import join


def needs_objective(spec: MergeSpec) -> bool:
    """Whether a method learns coefficients from unlabeled data (AdaMerging, DOGE AM; never `auto`'s candidates)."""
    from mergeflow.methods import method_class

    return spec.method != AUTO and method_class(spec.method).needs_objective


def merge_location(run: str, label: str, spec: MergeSpec, base: ObjectRef, experts: Mapping[str, ObjectRef],
                   root: str, statistics: Mapping[str, ObjectRef] | None = None,
                   unlabeled: tuple[TaskInputs, str] | None = None) -> str:
    """Where a run's merge `label` is stored: keyed by its spec and everything it reads (the statistics of a
    data-aware method; the task data and split a learned method learns on)."""
    return merged_uri(root, run, label, spec.model_dump(), base, experts, statistics, unlabeled)


def _merge_record(store: Store, out_uri: str) -> dict[str, Any]:
    return store.read_json(join(out_uri, "mergeflow.json"))


def engine_inputs(spec: MergeSpec, base: ObjectRef, experts: Mapping[str, ObjectRef], store: Store,
                  state: ObjectRef | None = None, device: str = "auto",
                  statistics: Mapping[str, ObjectRef] | None = None, unlabeled: Unlabeled | None = None,
                  subspaces: Mapping[str, ObjectRef] | None = None) -> dict[str, Any]:
    """What the engine (`merge_checkpoints`) reads besides the checkpoints: the stored pass, the statistics, the
    subspaces, a learned method's objective, and the point a sweep or search computed here (written, not merged
    again: bit-identical)."""
    precomputed = cached_point(spec.method, spec.params, base, experts, store, statistics, unlabeled)
    objective = unlabeled_objective(base, *unlabeled, store, device) if unlabeled and precomputed is None else None
    return {"state": read_sparsified(state, store) if state is not None else None,
            "statistics": [statistics[n].uri for n in experts] if statistics else None,
            "objective": objective, "subspaces": stored_subspaces(subspaces, store), "precomputed": precomputed}


def merge_experts(spec: MergeSpec, base: ObjectRef, experts: Mapping[str, ObjectRef], out_uri: str,
                  store: Store, state: ObjectRef | None = None, device: str = "auto",
                  statistics: Mapping[str, ObjectRef] | None = None, unlabeled: Unlabeled | None = None,
                  subspaces: Mapping[str, ObjectRef] | None = None) -> tuple[ObjectRef, dict[str, Any]]:
    """Merge the experts with one method into `out_uri` (with the sparsify stage's stored `state`, the subspace
    stage's factors, and for a learned method the objective over `unlabeled` = (tasks, split, evaluation settings);
    every input's digest checked where it is read); returns its reference and the engine's result record."""
    from mergeflow.merge import merge_checkpoints

    if store.exists(out_uri):
        return store.checkpoint_ref(out_uri), _merge_record(store, out_uri)
    inputs = engine_inputs(spec, base, experts, store, state, device, statistics, unlabeled, subspaces)
    try:
        result = merge_checkpoints(spec.method, store.base_weights(base), [r.uri for r in experts.values()],
                                   out_uri, spec.params, device=device, storage_options=store.options,
                                   cache=store.cache, progress=True,
                                   expected_digests=store.input_digests(base, experts, statistics), **inputs)
    except FileExistsError:  # a concurrent run published the same merge (same key: same bytes) first
        if not store.exists(out_uri):
            raise
        return store.checkpoint_ref(out_uri), _merge_record(store, out_uri)
    finally:
        if hasattr(inputs["precomputed"], "close"):
            inputs["precomputed"].close()
    return store.checkpoint_ref(out_uri), result.to_dict()


def merge_part(spec: MergeSpec, base: ObjectRef, experts: Mapping[str, ObjectRef], out_uri: str, index: int,
               parts: int, store: Store, state: ObjectRef | None = None, device: str = "auto",
               statistics: Mapping[str, ObjectRef] | None = None,
               subspaces: Mapping[str, ObjectRef] | None = None) -> str:
    """Merge layer group `index` of `parts` into `<out_uri>.parts/<index>` (reused when present); returns its URI."""
    from mergeflow.merge import merge_checkpoints

    uri = part_uri(out_uri, index)
    if not store.exists(out_uri) and not store.exists(uri):
        merge_checkpoints(spec.method, store.base_weights(base), [r.uri for r in experts.values()], uri,
                          spec.params, device=device, storage_options=store.options, cache=store.cache,
                          state=read_sparsified(state, store) if state is not None else None,
                          statistics=[statistics[n].uri for n in experts] if statistics else None,
                          part=(index, parts), subspaces=stored_subspaces(subspaces, store),
                          expected_digests=store.input_digests(base, experts, statistics))
    return uri


def assemble_merge(part_uris: Sequence[str], out_uri: str, store: Store
                   ) -> tuple[ObjectRef, dict[str, Any]]:
    """Join the parts into the merged model at `out_uri` and remove them; returns its reference and record."""
    from mergeflow.merge import assemble_parts

    if store.exists(out_uri):
        return store.checkpoint_ref(out_uri), _merge_record(store, out_uri)
    try:
        record = assemble_parts(part_uris, out_uri, storage_options=store.options, cache=store.cache).to_dict()
    except FileExistsError:  # a concurrent run assembled it first
        if not store.exists(out_uri):
            raise
        return store.checkpoint_ref(out_uri), _merge_record(store, out_uri)
    store.remove(parts_prefix(out_uri))
    return store.checkpoint_ref(out_uri), record


def atm_merge(spec: MergeSpec, base: ObjectRef, current: ObjectRef | None, round_experts: Mapping[str, ObjectRef],
              out_uri: str, store: Store, device: str = "auto") -> ObjectRef:
    """theta^(k): the rule `spec` applied to the round's updates theta_t^(k) - theta^(k-1), on top of theta^(k-1)
    (`current`; None: theta_0). Reused when already stored."""
    from mergeflow.merge import merge_checkpoints

    if not store.exists(out_uri):
        merge_checkpoints(spec.method, current.uri if current else store.base_weights(base),
                          [ref.uri for ref in round_experts.values()], out_uri, spec.params, device=device,
                          storage_options=store.options, cache=store.cache)
    return store.checkpoint_ref(out_uri)


# ---------------------------------------------------------------------------------------- the plan's stages

def unlabeled_split(label: str, ctx: Context) -> str:
    """The split whose inputs a learned merge learns on: a learned point chosen on validation (by a sweep or by
    `auto`) learned on the validation inputs, and its merge does too (the cached point)."""
    spec = ctx.labelled[label]
    return "validation" if spec.method == AUTO or spec.sweep is not None else ctx.config.statistics.unlabeled_split


def merge_reads(label: str, node: Node, ctx: Context) -> dict[str, Any]:
    """What merge `label` reads, as `merge_experts` keywords: its spec (the point chosen on validation for a
    swept or searched merge), its own sparsify pass, statistics, subspaces and unlabeled inputs."""
    spec = ctx.spec_of(label)
    own_pass = next((i for i in node.inputs if i == f"sparsify:{label}"), None)
    return {"spec": spec, "state": ctx.value(own_pass) if own_pass else None,
            "statistics": statistics_stage.read_by(spec, ctx), "subspaces": subspace_stage.read_by(spec, ctx),
            "unlabeled": (ctx.tasks, unlabeled_split(label, ctx), ctx.config.evaluation)
            if needs_objective(spec) else None}


def _where(node: Node, ctx: Context) -> Located:
    label = node.id.removeprefix("merge:")
    spec = ctx.spec_of(label)
    unlabeled = (ctx.tasks, unlabeled_split(label, ctx)) if needs_objective(spec) else None
    uri = merge_location(ctx.config.name, label, spec, ctx.base, ctx.experts, ctx.store.root,
                         statistics_stage.read_by(spec, ctx), unlabeled)
    return uri, lambda: ctx.store.checkpoint_ref(uri)


def _merge(node: Node, ctx: Context) -> tuple[ObjectRef, dict[str, Any]]:
    reads = merge_reads(node.id.removeprefix("merge:"), node, ctx)
    uri = _where(node, ctx)[0]
    return merge_experts(reads.pop("spec"), ctx.base, ctx.experts, uri, ctx.store, device=ctx.device, **reads)


STAGES = (Stage("merge", _where, _merge), Stage("merge_part"), Stage("assemble_merge", _where))
