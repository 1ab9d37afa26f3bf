"""The merge engine: validate inputs, run a method's global pass, stream every tensor through the method and
write sharded safetensors with provenance, published atomically.

`merge_checkpoints` works on stored checkpoints (any size: one tensor in memory at a time);
`merge_state_dicts` is the same engine on in-memory state dicts.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from mergeflow.progress import progress_bar

import mergeflow
from mergeflow.checkpoints import ShardedSafetensorsWriter, StateDictSource, TensorInfo, TensorSource, open_checkpoint
from mergeflow.checkpoints.writer import output_plan, parse_dtype, parse_size
from mergeflow.checkpoints.lora import LoraExpert, open_expert
from mergeflow.checkpoints.model_files import copy_model_files
from mergeflow.errors import IntegrityError
from mergeflow.methods import MergeMethod, build_method
from mergeflow.model_card import CARD, write_card
from mergeflow.methods.base import BLOCK_OFFSET, OUT_DTYPE, POOL_INPUTS, TENSOR_SUMS, recorded, sum_parts, with_inputs
from mergeflow.selection import is_float
from mergeflow.statistics import Statistics, open_statistics, statistics_source, validate_statistics
from mergeflow.subspace import SubspaceReader, expert_identities
from mergeflow.storage import exists, publish_directory, sha256_file, staging_dir
from mergeflow.content_cache import ContentCache
from mergeflow.task_vectors import DEFAULT_WINDOW, ExpertPool, Objective, resolve_device, shape_groups
from mergeflow.validation import check_finite, validate_compatible

MANIFEST = "mergeflow.json"


@dataclass(frozen=True)
class InputRef:
    role: str  # "base", "expert" or "statistics" (of the expert of the same name)
    name: str
    uri: str
    sha256: str


@dataclass(frozen=True)
class MergeResult:
    uri: str
    method: str
    params: dict[str, Any]
    inputs: list[InputRef]
    files: dict[str, str]  # output file name -> sha256
    seconds: float
    state: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def expert_name(uri: str) -> str:
    """A readable name from a checkpoint URI: its file stem, or its folder's name for model files and `adapter`."""
    path = PurePosixPath(uri.rstrip("/").split("://", 1)[-1])
    if path.name.startswith(("model.safetensors", "pytorch_model", "model-", "adapter_model")) or path.name == "adapter":
        path = path.parent
    name = path.name
    for suffix in (".safetensors", ".index.json", ".pt", ".pth", ".bin", ".ckpt"):
        name = name.removesuffix(suffix)
    return name


def plan_parts(infos: Sequence[TensorInfo], parts: int) -> list[list[str]]:
    """Cut the tensors, in checkpoint order, into at most `parts` contiguous groups of about equal bytes (the layer
    groups a flow merges as separate tasks); no group is empty."""
    sizes = [math.prod(info.shape) * torch.empty((), dtype=info.dtype).element_size() for info in infos]
    total, groups, used = sum(sizes), [[]], 0
    for info, size in zip(infos, sizes):
        if groups[-1] and len(groups) < parts and used >= total * len(groups) / parts:
            groups.append([])
        groups[-1].append(info.name)
        used += size
    return groups


def part_name(index: int, parts: int) -> str:
    return f"model-{index + 1:05d}-of-{parts:05d}.safetensors"


Patch = Callable[[str, torch.Tensor, torch.Tensor], None]  # (tensor, flat indices, values in its dtype)


def merge_pool(method: MergeMethod, pool: ExpertPool, write: Callable[[str, torch.Tensor], None], *,
               state: dict[str, Any] | None = None, progress: bool = False,
               only: Collection[str] | None = None, patch: Patch | None = None,
               write_rows: Callable[[str, int, torch.Tensor], None] | None = None,
               out_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Run `method` over `pool`, handing each output tensor (in the base's dtype, on CPU) to `write`; returns the
    method's state (with what the merge pass settled, e.g. TIES's majority sign).

    Non-float tensors are carried over from the base. Tensors the method batches (`MergeMethod.grouping`) are
    merged last, in same-shape groups. `only` restricts the output to those tensors (one part of a merge split
    across tasks). Float tensors stream in through the pool's read-ahead (another thread). With `patch`, a whole
    merge runs the lighter `prepare_merge` and corrects tensors already written once the pass has settled them.
    Large tensors may come in blocks of rows (`MergeMethod.read_plan`: elementwise and two-pass methods), written
    through `write_rows` (name, first row, rows) when given, so memory stays within the window whatever N.
    `out_dtype`: the float tensors' output dtype (default: the base's).
    """
    if state is None:
        prepare = method.prepare_merge if only is None and patch is not None else method.prepare
        state = prepare(pool, progress=progress)
    run_state = dict(with_inputs(state, pool))  # this merge's own copy (accumulators go here)
    infos = output_plan([info for info in pool.infos() if only is None or info.name in only], out_dtype)
    names, max_bytes = method.grouping(state, pool.device)
    batched = set(names).intersection(info.name for info in infos if is_float(info.dtype))
    bar = progress_bar(total=len(infos), desc=f"merging ({method.name})", disable=not progress)
    keys = [info.name for info in infos if info.name not in batched and is_float(info.dtype)]
    streamed = pool._read_ahead(method.read_plan(pool, keys, run_state))  # (name, rows or None, base, tau)
    try:
        for info in infos:
            if info.name in batched:
                continue
            if not is_float(info.dtype):
                write(info.name, pool.base.get(info.name))
            else:
                _merge_blocks(method, pool, info, streamed, run_state, write, write_rows)
            bar.update()
    finally:
        streamed.close()
    for group in shape_groups([info for info in infos if info.name in batched], len(pool.experts), max_bytes):
        bases = torch.stack([pool.base_tensor(info.name) for info in group])
        task_vectors = torch.empty((len(group), len(pool.experts), *bases.shape[1:]), dtype=torch.float32,
                                   device=pool.device)
        for g, info in enumerate(group):
            task_vectors[g] = pool.task_vectors(info.name, bases[g])
        merged = method.merge_group([info.name for info in group], bases, task_vectors, run_state)
        del task_vectors
        for info, tensor in zip(group, merged):
            write(info.name, tensor.to("cpu", info.dtype))
        bar.update(len(group))
    bar.close()
    corrections = method.finish(run_state)
    if corrections and patch is None:
        raise RuntimeError(f"{method.name}: the merge pass left corrections, but no patch callback was given")
    dtypes = {info.name: info.dtype for info in infos}
    for name, (index, values) in corrections.items():
        patch(name, index, values.to("cpu", dtypes[name]))
    return {key: value for key, value in run_state.items() if key not in POOL_INPUTS}


def _merge_blocks(method: MergeMethod, pool: ExpertPool, info: TensorInfo,
                  streamed: Iterator[tuple[str, tuple[int, int] | None, torch.Tensor, torch.Tensor]],
                  state: dict[str, Any], write: Callable[[str, torch.Tensor], None],
                  write_rows: Callable[[str, int, torch.Tensor], None] | None) -> None:
    """Merge one float tensor from the stream, whole or block by block of rows (`MergeMethod.read_plan`; a two-pass
    method's blocks come twice: first for `block_sums`), written as they come with `write_rows`, else joined first."""
    name, rows, base, task_vectors = next(streamed)
    state[OUT_DTYPE], state[TENSOR_SUMS], parts = info.dtype, None, []  # whole tensors: the method sums them
    if rows is not None and method.two_pass and method.needs_sums(name, state):
        partials = []
        while not partials or rows[0] > 0:  # up to the second pass's first block
            state[BLOCK_OFFSET] = rows[0] * math.prod(info.shape[1:])
            partials.append(method.block_sums(name, base, task_vectors, state))
            name, rows, base, task_vectors = next(streamed)
        state[TENSOR_SUMS] = sum_parts(partials)
    while True:
        state[BLOCK_OFFSET] = (0 if rows is None else rows[0]) * math.prod(info.shape[1:])
        merged = pool.output(method.merge_tensor(name, base, task_vectors, state), info.dtype, base)
        pool.check_merged(name, merged)  # as it is written (half the bytes to read for a bf16 model)
        if rows is None or write_rows is None:
            parts.append(merged)
        else:
            write_rows(name, rows[0], merged)
        if rows is None or rows[1] >= info.shape[0]:
            break
        name, rows, base, task_vectors = next(streamed)
    if parts:
        write(info.name, parts[0] if len(parts) == 1 else torch.cat(parts))


def patch_dict(out: dict[str, torch.Tensor]) -> Patch:
    """`merge_pool`'s patch for output collected in a dict (write=`out.__setitem__`)."""
    def patch(name: str, index: torch.Tensor, values: torch.Tensor) -> None:
        out[name] = out[name].clone()
        out[name].view(-1)[index] = values
    return patch


def merge_state_dicts(method: str, base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
                      params: Mapping[str, Any] | None = None, *, device: str | torch.device = "cpu",
                      state: dict[str, Any] | None = None,
                      statistics: Sequence[Mapping[str, torch.Tensor] | Statistics] | None = None,
                      objective: Objective | None = None, warm: Any = None) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts with the same engine and checks as `merge_checkpoints` (`warm`: `ExpertPool`'s)."""
    merge_method = build_method(method, params)
    merge_method.check_expert_count(len(experts))
    base_source = StateDictSource(base, "base")
    sources = [StateDictSource(sd, f"expert {i}") for i, sd in enumerate(experts)]
    stats = None if statistics is None else [
        statistics_source(sd, f"statistics of expert {i}") for i, sd in enumerate(statistics)]
    validate_compatible(base_source, sources)
    if stats is not None:
        validate_statistics(base_source, stats, len(sources))
    for source in (base_source, *sources, *(stats or ())):
        check_finite(source)
    pool = ExpertPool(base_source, sources, [s.label for s in sources], resolve_device(device), stats, objective,
                      warm=warm)
    out: dict[str, torch.Tensor] = {}
    merge_pool(merge_method, pool, out.__setitem__, state=state, patch=patch_dict(out))
    return out


def _subspace_reader(source: str | Path | SubspaceReader, experts: Sequence[str]) -> SubspaceReader:
    if isinstance(source, SubspaceReader):
        source.check_experts(experts)
        return source
    return SubspaceReader(source, experts)


def merge_checkpoints(method: str, base: str, experts: Sequence[str], out: str,
                      params: Mapping[str, Any] | None = None, *, device: str | torch.device = "auto",
                      shard_size: int | str = "2GB", storage_options: Mapping[str, Any] | None = None,
                      cache: ContentCache | None = None, state: dict[str, Any] | None = None,
                      overwrite: bool = False, progress: bool = False,
                      extra_metadata: Mapping[str, str] | None = None,
                      statistics: Sequence[str] | None = None, objective: Objective | None = None,
                      part: tuple[int, int] | None = None,
                      subspaces: Mapping[str, str | Path | SubspaceReader] | None = None,
                      expected_digests: Sequence[str] | None = None,
                      precomputed: Mapping[str, torch.Tensor] | None = None,
                      window: int | str = DEFAULT_WINDOW, out_dtype: str | None = None) -> MergeResult:
    """Merge stored checkpoints into a new sharded safetensors directory at `out` (local path or fsspec URL).

    Data-aware methods read `statistics`: one statistics file per expert, in the experts' order. Subspace methods
    read the stored factors in `subspaces` (kind -> local directory of `mergeflow.subspace.write_subspace`, or a
    reader of a stored one) when given; a factor file is read only if a layer merged here is in it.
    `expected_digests` (base, experts, then statistics) are checked against the checkpoints read.

    Everything that can be checked is checked before compute (method and parameters, output not already
    present, every file readable and complete, keys/shapes/dtypes, NaN/Inf); the output is built in a
    staging directory and published only when complete.

    `part=(i, n)` merges only the i-th of `plan_parts(.., n)` into a single file `part_name(i, n)` (with its own
    manifest); `assemble_parts` joins the n part outputs into one model.

    `window`: bytes of inputs (as fp32) read ahead of the merge, e.g. "1GB"; with one tensor at a time it bounds
    the engine's memory, whatever the number of experts.

    `precomputed`: the merged tensors of exactly this method, parameters and inputs, computed before (a sweep
    point kept in the local cache): every input is still checked, then they are written instead of merged again.

    `out_dtype` ("float32", "float16" or "bfloat16"): the merged float tensors' dtype (default: the base's); the
    merge itself computes in fp32 either way.
    """
    started = time.perf_counter()
    merge_method = build_method(method, params)
    merge_method.check_expert_count(len(experts))
    dtype = parse_dtype(out_dtype)
    if not overwrite and exists(out, storage_options):
        raise FileExistsError(f"{out} already exists (pass overwrite to replace it)")
    cache = cache or ContentCache()
    base_ckpt = open_checkpoint(base, storage_options=storage_options, cache=cache)
    expert_ckpts = [open_expert(uri, base_ckpt, storage_options=storage_options, cache=cache) for uri in experts]
    stats_ckpts = None if statistics is None else [
        open_statistics(uri, storage_options=storage_options, cache=cache) for uri in statistics]
    checkpoints: list[TensorSource] = [base_ckpt, *expert_ckpts, *(stats_ckpts or ())]
    try:
        if expected_digests is not None:
            for uri, ckpt, digest in zip([base, *experts, *(statistics or ())], checkpoints, expected_digests,
                                         strict=True):
                if ckpt.digest != digest:
                    raise IntegrityError(f"{uri}: content digest {ckpt.digest} != expected {digest}")
        validate_compatible(base_ckpt, expert_ckpts)
        if stats_ckpts is not None:
            validate_statistics(base_ckpt, stats_ckpts, len(expert_ckpts))
        only = None if part is None else set(
            plan_parts([base_ckpt.info(k) for k in base_ckpt.keys()], part[1])[part[0]])
        inline = merge_method.checks_inline and precomputed is None  # checked in the merged output
        for ckpt in checkpoints:
            if isinstance(ckpt, LoraExpert):  # the adapter's own tensors (its deltas are finite if they are)
                check_finite(ckpt.adapter, progress=progress)
            elif not (inline and ckpt in (base_ckpt, *expert_ckpts)):
                check_finite(ckpt, progress=progress, keys=None if only is None else
                             only | {k for k in ckpt.keys() if k.split("::", 1)[0] in only})
        names = [expert_name(uri) for uri in experts]
        inputs = [InputRef("base", expert_name(base), base, base_ckpt.digest)] + [
            InputRef("expert", n, uri, c.digest) for n, uri, c in zip(names, experts, expert_ckpts)] + [
            InputRef("statistics", n, uri, c.digest) for n, uri, c in zip(names, statistics or (), stats_ckpts or ())]
        pool = ExpertPool(base_ckpt, expert_ckpts, names, resolve_device(device), stats_ckpts, objective,
                          check_finite=inline, window=parse_size(window))
        pool.subspaces = {kind: _subspace_reader(source, expert_identities(pool))
                          for kind, source in (subspaces or {}).items()}
        provenance = {
            "format": "pt",
            "mergeflow_version": mergeflow.__version__,
            "merge_method": merge_method.name,
            "merge_params": merge_method.params.model_dump_json(),
            "inputs": json.dumps([asdict(i) for i in inputs]),
            **dict(extra_metadata or {}),
        }
        staged = staging_dir(out, cache)
        try:
            plan = output_plan([info for info in pool.infos() if only is None or info.name in only], dtype)
            writer = ShardedSafetensorsWriter(staged, plan, shard_size=shard_size if part is None else 2**62,
                                              metadata=provenance)
            pool.out_buffers = writer.buffer
            try:
                if precomputed is None:
                    state = merge_pool(merge_method, pool, writer.write, state=state, progress=progress, only=only,
                                       patch=writer.patch, write_rows=writer.write_rows, out_dtype=dtype)
                else:
                    _write_precomputed(precomputed, plan, writer.write, out)
                    state = state or {}
            except BaseException:
                writer.abort()
                raise
            files = writer.close()
            if part is not None:
                (staged / "model.safetensors").rename(staged / part_name(*part))
                files = {part_name(*part): files["model.safetensors"]}
            else:
                files.update(copy_model_files(base, staged, storage_options, cache))
                files[CARD] = write_card(staged, merge_method.name, merge_method.params.model_dump(),
                                         [asdict(ref) for ref in inputs], files, out_dtype)
            result = MergeResult(out, merge_method.name, merge_method.params.model_dump(), inputs, files,
                                 round(time.perf_counter() - started, 3), recorded(state))
            manifest = {**result.to_dict(), "mergeflow_version": mergeflow.__version__}
            (staged / MANIFEST).write_text(json.dumps(manifest, indent=2))
            publish_directory(staged, out, storage_options, overwrite=overwrite, last=(MANIFEST,), digests=files)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
    finally:
        for ckpt in (base_ckpt, *expert_ckpts, *(stats_ckpts or ())):
            ckpt.close()
    return result


def _write_precomputed(tensors: Mapping[str, torch.Tensor], plan: Sequence[TensorInfo],
                       write: Callable[[str, torch.Tensor], None], out: str) -> None:
    for info in progress_bar(plan, disable=True):  # a stop is honoured between two tensors
        tensor = tensors.get(info.name)
        if tensor is None or tuple(tensor.shape) != tuple(info.shape):
            raise IntegrityError(f"{out}: the precomputed merge has no tensor {info.name!r} of shape "
                                 f"{tuple(info.shape)}")
        write(info.name, tensor.to("cpu", info.dtype))


def assemble_parts(parts: Sequence[str], out: str, *, storage_options: Mapping[str, Any] | None = None,
                   cache: ContentCache | None = None) -> MergeResult:
    """Join the outputs of `merge_checkpoints(..., part=(i, n))` (in order) into one sharded model at `out`:
    their shards under their own names, an index, and a manifest summing their work; published all or nothing
    (the manifest last), every part verified against its own manifest."""
    from mergeflow.storage import fetch_directory

    cache = cache or ContentCache()
    if exists(out, storage_options):
        raise FileExistsError(f"{out} already exists")
    manifests, local = [], []
    for uri in parts:
        directory, files = fetch_directory(uri, cache, storage_options)
        manifest = json.loads((directory / MANIFEST).read_text())
        for name, digest in manifest["files"].items():
            if files.get(name) != digest:
                raise IntegrityError(f"{uri}: {name} does not match its manifest")
        manifests.append(manifest)
        local.append(directory)
    first = manifests[0]
    if any(m["method"] != first["method"] or m["params"] != first["params"] or m["inputs"] != first["inputs"]
           for m in manifests):
        raise ValueError("the parts were not merged with the same method, parameters and inputs")
    staged = staging_dir(out, cache)
    try:
        staged.mkdir(parents=True, exist_ok=True)
        weight_map, total, files = {}, 0, {}
        for directory, manifest in zip(local, manifests):
            (name,) = manifest["files"]
            shutil.copyfile(directory / name, staged / name)
            files[name] = manifest["files"][name]
            with open_checkpoint(str(staged / name), cache=cache) as shard:
                for key in shard.keys():
                    weight_map[key] = name
                    info = shard.info(key)
                    total += math.prod(info.shape) * torch.empty((), dtype=info.dtype).element_size()
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (staged / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        files["model.safetensors.index.json"] = sha256_file(staged / "model.safetensors.index.json")
        files[CARD] = write_card(staged, first["method"], first["params"], first["inputs"], files)
        result = MergeResult(out, first["method"], first["params"], [InputRef(**i) for i in first["inputs"]], files,
                             round(sum(m["seconds"] for m in manifests), 3),
                             {"parts": [m.get("state", {}) for m in manifests]})
        (staged / MANIFEST).write_text(json.dumps({**result.to_dict(), "mergeflow_version": mergeflow.__version__},
                                                  indent=2))
        publish_directory(staged, out, storage_options, last=(MANIFEST,), digests=files)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return result
