"""The pipeline's stages as plain library calls on references (URI + sha256), for every model family
(`mergeflow.families`: Hugging Face text encoders, open_clip and Hugging Face CLIP vision towers, seq2seq models);
the family travels with the pretrained model's reference (`ModelRef`). Prefect tasks in `tasks/` wrap these one to
one; nothing here knows about Prefect or MLflow.

Store layout under `storage.root`:
  base/<model>/                 a built-in pretrained model directory (config, tokenizer, model.safetensors)
  datasets/<task>-<fp>/         a built-in task's data in its family's layout
  heads/<task>-<fp>.<ext>       frozen head made from the pretrained model (linear probe, CLIP zero-shot head,
                                seq2seq prompt)
  experts/<task>-<fp>/model.safetensors  fine-tuned encoder (fp = digest of everything that determines it,
                                so a rerun with the same inputs finds and reuses it)
  merged/<run>/<method>-<fp>/   merged checkpoints with provenance
  sweeps/<method>-<fp>.json     validation scores of one grid point (its weights are never stored)
  evaluations/<fp>.json         scores of one stored model on one split
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict
from mergeflow.checkpoints.safetensors_format import save_safetensors

from mergeflow.config import (DataConfig, EvalConfig, FinetuneConfig, MergeSpec, ModelConfig, StatisticsConfig,
                              StorageConfig, TuningConfig)
from mergeflow.errors import ConfigError, IntegrityError, ObjectNotFoundError
from mergeflow.families import Family, LoadedModel, TaskData, get_family
from mergeflow.storage import (ContentCache, directory_digest, exists, fetch_directory, filesystem, is_remote, join,
                               local_path, publish_directory, staging_dir)

class ObjectRef(BaseModel):
    """What flows between stages: where an object lives and what its content is."""

    model_config = ConfigDict(frozen=True)
    uri: str
    sha256: str


class ModelRef(ObjectRef):
    """The pretrained model directory, with the family that reads it."""

    family: str = "hf_text"


def family_of(base: ObjectRef) -> Family:
    return get_family(getattr(base, "family", "hf_text"))


def fingerprint(*parts: Any) -> str:
    """A short, stable digest of JSON-serialisable parts (used in store paths and cache keys)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_cache(storage: StorageConfig) -> ContentCache:
    return ContentCache(Path(storage.cache_dir) if storage.cache_dir else None)


def _publish_or_reuse(build, final_uri: str, storage: StorageConfig, cache: ContentCache) -> ObjectRef:
    """Return the stored directory at `final_uri`, building and publishing it first if it is not there."""
    if not exists(final_uri, storage.options()):
        staged = staging_dir(final_uri, cache)
        try:
            build(staged)
            publish_directory(staged, final_uri, storage.options())
        except FileExistsError:  # published meanwhile by a concurrent run: use that one
            pass
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    _, files = fetch_directory(final_uri, cache, storage.options())
    return ObjectRef(uri=final_uri, sha256=directory_digest(files))


def local_directory(ref: ObjectRef, storage: StorageConfig, cache: ContentCache) -> Path:
    """A local copy of a stored directory, verified against the reference's digest."""
    path, files = fetch_directory(ref.uri, cache, storage.options())
    if directory_digest(files) != ref.sha256:
        raise IntegrityError(f"{ref.uri}: content digest {directory_digest(files)} != expected {ref.sha256}")
    return path


def local_directory_of(ref: ObjectRef, storage: StorageConfig) -> Path:
    """A local copy of a stored directory (a merged model), for attaching it to a tracking run."""
    return fetch_directory(ref.uri, make_cache(storage), storage.options())[0]


def local_file(ref: ObjectRef, storage: StorageConfig, cache: ContentCache) -> Path:
    return cache.fetch(ref.uri, storage.options(), expected_sha256=ref.sha256).path


def materialize_pretrained(model: ModelConfig, storage: StorageConfig) -> ModelRef:
    """Reference the pretrained model directory (checked against its family's layout); a built-in model is put
    in the store once."""
    family = get_family(model.family)
    cache = make_cache(storage)
    if model.pretrained not in family.builtin_models:
        path, files = _fetch_input_directory(model.pretrained, "model.pretrained", storage, cache)
        family.check_model_dir(path, f"model.pretrained ({model.pretrained})")
        return ModelRef(uri=model.pretrained, sha256=directory_digest(files), family=model.family)
    ref = _publish_or_reuse(lambda staged: family.write_builtin_model(model.pretrained, staged),
                            join(storage.root, "base", model.pretrained), storage, cache)
    return ModelRef(uri=ref.uri, sha256=ref.sha256, family=model.family)


def _fetch_input_directory(uri: str, field: str, storage: StorageConfig, cache: ContentCache,
                           recursive: bool = False) -> tuple[Path, dict[str, str]]:
    try:
        path, files = fetch_directory(uri, cache, storage.options(), recursive=recursive)
    except (FileNotFoundError, ObjectNotFoundError):
        raise ConfigError(f"{field}: directory {uri} not found") from None
    if not files:
        raise ConfigError(f"{field}: directory {uri} is empty or missing")
    return path, files


def prepare_dataset(task: str, data: DataConfig, storage: StorageConfig, dataset: str | None = None,
                    family: str = "hf_text") -> ObjectRef:
    """Read a built-in task's real data, split it, and store it in its family's layout; or check a user's dataset
    directory (`dataset`, used where it is) and reference it by its content digest."""
    reader = get_family(family)
    cache = make_cache(storage)
    if dataset is not None:
        field = f"tasks[{task}].dataset"
        path, files = _fetch_input_directory(dataset, field, storage, cache, recursive=True)
        try:
            reader.read_dataset(path, task, splits=[])  # the layout, before any model runs
        except ConfigError as exc:
            raise ConfigError(f"{field}: {dataset}: {exc}") from None
        return ObjectRef(uri=dataset, sha256=directory_digest(files))
    sizes = {"probe_per_class": data.probe_per_class, "train": data.train, "validation": data.validation,
             "test": data.test}

    def build(staged: Path) -> None:
        reader.write_builtin_dataset(task, sizes, data.seed, cache.root / "wheels", staged)

    uri = join(storage.root, "datasets", f"{task}-{fingerprint(sizes, data.seed)}")
    return _publish_or_reuse(build, uri, storage, cache)


def read_task(task: str, dataset: ObjectRef, base: ObjectRef, storage: StorageConfig, cache: ContentCache,
              splits: Sequence[str] | None = None) -> TaskData:
    """Task `task`'s stored data (only `splits`), read by the base model's family."""
    path, files = fetch_directory(dataset.uri, cache, storage.options(), recursive=True)
    if directory_digest(files) != dataset.sha256:
        raise IntegrityError(f"{dataset.uri}: content digest {directory_digest(files)} != expected {dataset.sha256}")
    try:
        return family_of(base).read_dataset(path, task, splits)
    except ConfigError as exc:
        raise ConfigError(f"{dataset.uri}: {exc}") from None


def load_model(base: ObjectRef, storage: StorageConfig, cache: ContentCache, weights: ObjectRef | None,
               device: str, state_dict: Mapping[str, Any] | None = None) -> LoadedModel:
    """The base model's family model with `weights` (a stored checkpoint, verified), an in-memory `state_dict`, or
    the pretrained weights."""
    from mergeflow.checkpoints import open_checkpoint
    from mergeflow.task_vectors import resolve_device

    model_dir = local_directory(base, storage, cache)
    if weights is not None:
        with open_checkpoint(weights.uri, storage_options=storage.options(), cache=cache) as ckpt:
            if ckpt.digest != weights.sha256:
                raise IntegrityError(f"{weights.uri}: digest {ckpt.digest} != expected {weights.sha256}")
            state_dict = {k: ckpt.get(k) for k in ckpt.keys()}
    return family_of(base).load(model_dir, state_dict, resolve_device(device))


def load_head(head: ObjectRef, base: ObjectRef, storage: StorageConfig, cache: ContentCache) -> Any:
    return family_of(base).load_head(local_file(head, storage, cache), head.uri)


def fit_head(task: str, base: ObjectRef, dataset: ObjectRef, evaluation: EvalConfig, storage: StorageConfig,
             device: str = "auto", head: str | None = None) -> ObjectRef:
    """The task's frozen head: the user's file `head` (checked against the task's classes), or one made from the
    pretrained model by its family (a linear probe on the probe split, a CLIP zero-shot head, a seq2seq prompt)."""
    from mergeflow.task_vectors import resolve_device

    family = family_of(base)
    cache = make_cache(storage)
    if head is not None:
        try:
            local = cache.fetch(head, storage.options())
        except (FileNotFoundError, ObjectNotFoundError):
            raise ConfigError(f"tasks[{task}].head: {head} not found") from None
        loaded = family.load_head(local.path, f"tasks[{task}].head ({head})")
        family.check_head(loaded, read_task(task, dataset, base, storage, cache, splits=[]),
                          f"tasks[{task}].head ({head})")
        return ObjectRef(uri=head, sha256=local.sha256)
    uri = join(storage.root, "heads", f"{task}-{fingerprint(base.sha256, dataset.sha256, evaluation.max_length)}"
                                      f"{family.head_suffix}")
    if not exists(uri, storage.options()):
        data = read_task(task, dataset, base, storage, cache)
        model_dir = local_directory(base, storage, cache)
        _publish_file(uri, storage, cache,
                      lambda path: family.build_head(data, model_dir, evaluation, resolve_device(device), path))
    return ObjectRef(uri=uri, sha256=cache.fetch(uri, storage.options()).sha256)


def _publish_file(uri: str, storage: StorageConfig, cache: ContentCache, write) -> None:
    """Write one file through a staging directory and publish it atomically next to its final name."""
    parent, name = uri.rsplit("/", 1)
    staged = staging_dir(uri, cache)
    try:
        write(staged / name)
        if is_remote(uri):
            publish_directory(staged, parent, storage.options(), overwrite=True)
        else:
            local_path(parent).mkdir(parents=True, exist_ok=True)
            (staged / name).replace(local_path(uri))
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def expert_uri(task: str, base: ObjectRef, dataset: ObjectRef, head: ObjectRef, settings: FinetuneConfig,
               storage: StorageConfig) -> str:
    fp = fingerprint(base.sha256, dataset.sha256, head.sha256, settings.model_dump(exclude={"checkpoint_every"}))
    return join(storage.root, "experts", f"{task}-{fp}", "model.safetensors")


def finetune_expert(task: str, base: ObjectRef, dataset: ObjectRef, head: ObjectRef, settings: FinetuneConfig,
                    storage: StorageConfig, device: str = "auto", progress: bool = True
                    ) -> tuple[ObjectRef, dict[str, Any]]:
    """Fine-tune the encoder on the task's train split under its frozen head and store the expert.

    Returns the expert's reference and a report (losses, seconds; `reused` when a stored expert with the same
    fingerprint already existed and no training ran).
    """
    from mergeflow.finetune import FinetuneSettings

    cache = make_cache(storage)
    uri = expert_uri(task, base, dataset, head, settings, storage)
    report_uri = uri.rsplit("/", 1)[0] + "/training.json"
    if exists(uri, storage.options()):
        report = {"reused": True}
        if exists(report_uri, storage.options()):
            report.update(json.loads(cache.fetch(report_uri, storage.options()).path.read_text()))
            report["reused"] = True
        return ObjectRef(uri=uri, sha256=cache.fetch(uri, storage.options()).sha256), report
    data = read_task(task, dataset, base, storage, cache, ["train"])
    model = load_model(base, storage, cache, None, device)
    checkpoints = join(storage.root, "checkpoints", uri.rsplit("/", 2)[1])  # resumed by a retried task
    family = family_of(base)
    result = family.finetune(model, load_head(head, base, storage, cache), data.splits["train"],
                             FinetuneSettings(**settings.model_dump()), progress=progress,
                             checkpoint_dir=checkpoints if settings.checkpoint_every else None,
                             storage_options=storage.options())
    report = {"losses": result.losses, "seconds": round(result.seconds, 2), "reused": False,
              "train_examples": family.split_size(data.splits["train"]), "resumed_from": result.resumed_from}
    directory = uri.rsplit("/", 1)[0]

    def build(staged: Path) -> None:
        save_safetensors(result.state_dict, staged / "model.safetensors",
                         metadata={"format": "pt", "task": task, "base_sha256": base.sha256,
                                   "dataset_sha256": dataset.sha256, "head_sha256": head.sha256,
                                   "finetune": json.dumps(settings.model_dump())})
        (staged / "training.json").write_text(json.dumps(report))

    _publish_or_reuse(build, directory, storage, cache)
    if settings.checkpoint_every and exists(checkpoints, storage.options()):  # the expert is published: drop them
        fs, path = filesystem(checkpoints, storage.options())
        fs.rm(path, recursive=True)
    return ObjectRef(uri=uri, sha256=cache.fetch(uri, storage.options()).sha256), report


def statistic_kinds(specs: list[MergeSpec]) -> tuple[str, ...]:
    """The statistic kinds the data-aware methods among `specs` need (empty when none is data-aware)."""
    from mergeflow.methods import build_method
    from mergeflow.methods.data_aware import DataAwareMethod
    from mergeflow.statistics import KINDS

    wanted: set[str] = set()
    for spec in specs:
        method = build_method(spec.method, spec.params)
        if isinstance(method, DataAwareMethod):
            wanted.update(method.statistic_kinds())
    return tuple(k for k in KINDS if k in wanted)


def compute_statistics(task: str, base: ObjectRef, expert: ObjectRef, dataset: ObjectRef, head: ObjectRef,
                       kinds: tuple[str, ...], settings: StatisticsConfig, storage: StorageConfig,
                       device: str = "auto") -> tuple[ObjectRef, dict[str, Any]]:
    """Per-expert statistics on its task's data, stored beside the expert checkpoint and reused when the expert,
    data, head and settings are unchanged. Returns the reference and a report (examples, seconds, reused)."""
    import time

    from mergeflow.statistics import save_statistics

    cache = make_cache(storage)
    fp = fingerprint(expert.sha256, dataset.sha256, head.sha256, kinds, settings.model_dump())
    uri = join(expert.uri.rsplit("/", 1)[0], f"statistics-{fp}.safetensors")
    if exists(uri, storage.options()):
        return ObjectRef(uri=uri, sha256=cache.fetch(uri, storage.options()).sha256), {"reused": True}
    started = time.perf_counter()
    data = read_task(task, dataset, base, storage, cache, [settings.split])
    model = load_model(base, storage, cache, expert, device)
    stats = family_of(base).statistics(model, load_head(head, base, storage, cache), data.splits[settings.split],
                                       kinds, settings)
    stats.metadata.update({"task": task, "expert_sha256": expert.sha256, "dataset_sha256": dataset.sha256})
    _publish_file(uri, storage, cache, lambda path: save_statistics(stats, path))
    report = {"reused": False, "examples": int(stats.metadata["examples"]),
              "seconds": round(time.perf_counter() - started, 2)}
    return ObjectRef(uri=uri, sha256=cache.fetch(uri, storage.options()).sha256), report


def atm_finetune(task: str, base: ObjectRef, start: ObjectRef | None, dataset: ObjectRef, head: ObjectRef,
                 settings: FinetuneConfig, split: str, storage: StorageConfig, device: str = "auto",
                 progress: bool = True) -> tuple[ObjectRef, dict[str, Any]]:
    """One ATM round of one task: fine-tune from `start` (a merged model; None: theta_0) on `split` with
    `settings` (the round's budget) and store the result (reused when every input is unchanged)."""
    from mergeflow.finetune import FinetuneSettings

    cache = make_cache(storage)
    fp = fingerprint(base.sha256, start.sha256 if start else None, dataset.sha256, head.sha256, split,
                     settings.model_dump(exclude={"checkpoint_every"}))
    directory = join(storage.root, "atm", f"{task}-{fp}")
    uri = join(directory, "model.safetensors")
    if exists(uri, storage.options()):
        return ObjectRef(uri=uri, sha256=cache.fetch(uri, storage.options()).sha256), {"reused": True}
    data = read_task(task, dataset, base, storage, cache, [split])
    model = load_model(base, storage, cache, start, device)
    result = family_of(base).finetune(model, load_head(head, base, storage, cache), data.splits[split],
                                      FinetuneSettings(**settings.model_dump()), progress=progress,
                                      checkpoint_dir=join(storage.root, "checkpoints", f"atm-{task}-{fp}")
                                      if settings.checkpoint_every else None, storage_options=storage.options())

    def build(staged: Path) -> None:
        save_safetensors(result.state_dict, staged / "model.safetensors",
                         metadata={"format": "pt", "task": task, "start_sha256": start.sha256 if start else "",
                                   "split": split, "finetune": json.dumps(settings.model_dump())})

    _publish_or_reuse(build, directory, storage, cache)
    report = {"reused": False, "losses": result.losses, "seconds": round(result.seconds, 2)}
    return ObjectRef(uri=uri, sha256=cache.fetch(uri, storage.options()).sha256), report


def atm_merge(spec: MergeSpec, base: ObjectRef, current: ObjectRef | None, round_experts: Mapping[str, ObjectRef],
              out_uri: str, storage: StorageConfig, device: str = "auto") -> ObjectRef:
    """theta^(k): the rule `spec` applied to the round's updates theta_t^(k) - theta^(k-1), on top of theta^(k-1)
    (`current`; None: theta_0). Reused when already stored."""
    from mergeflow.merge import merge_checkpoints

    cache = make_cache(storage)
    if not exists(out_uri, storage.options()):
        merge_checkpoints(spec.method, current.uri if current else base_weights(base),
                          [ref.uri for ref in round_experts.values()], out_uri, spec.params, device=device,
                          storage_options=storage.options(), cache=cache)
    return fetch_checkpoint(out_uri, storage)


def fetch_checkpoint(uri: str, storage: StorageConfig) -> ObjectRef:
    """Fetch (through the content cache) and open a checkpoint: validates its format, returns its digest."""
    from mergeflow.checkpoints import open_checkpoint

    with open_checkpoint(uri, storage_options=storage.options(), cache=make_cache(storage)) as ckpt:
        return ObjectRef(uri=uri, sha256=ckpt.digest)


def _modified(info: Mapping[str, Any]) -> float:
    value = info.get("LastModified", info.get("mtime", info.get("created", 0)))
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


def latest_checkpoint(prefix: str, storage: StorageConfig) -> str:
    """URI of the newest `*.safetensors` checkpoint under `prefix` (statistics files and partial uploads aside);
    ties go to the larger name. ObjectNotFoundError naming the prefix when there is none."""
    from mergeflow.errors import ObjectNotFoundError
    from mergeflow.storage import storage_error

    fs, path = filesystem(prefix, storage.options())
    try:
        found = fs.find(path, detail=True) if fs.exists(path) else {}
    except Exception as exc:  # noqa: BLE001 - classified into input vs transient errors
        raise storage_error(prefix, exc, "listing") from exc
    candidates = {name: info for name, info in found.items()
                  if name.endswith(".safetensors") and not name.rsplit("/", 1)[-1].startswith(("statistics-", "."))
                  and ".partial" not in name}
    if not candidates:
        raise ObjectNotFoundError(f"{prefix}: no *.safetensors checkpoint under this prefix")
    newest = max(candidates, key=lambda name: (_modified(candidates[name]), name))
    return f"{prefix.split('://', 1)[0]}://{newest}" if is_remote(prefix) else newest


def run_inputs_digest(config_json: Mapping[str, Any], base: ObjectRef, experts: Mapping[str, ObjectRef],
                      task_inputs: Mapping[str, tuple[ObjectRef, ObjectRef]]) -> str:
    """What decides a run's results: its config (but the run name) and the content digests of its base, experts,
    and each task's dataset and head (a dataset changed in place changes the digest)."""
    settings = {k: v for k, v in config_json.items() if k != "name"}
    return fingerprint(settings, base.sha256, {n: e.sha256 for n, e in sorted(experts.items())},
                       {n: (d.sha256, h.sha256) for n, (d, h) in sorted(task_inputs.items())})


def last_success(name: str, storage: StorageConfig) -> dict[str, Any] | None:
    """The record of run `name`'s last successful completion (`runs/<name>/last-success.json`), if any."""
    uri = join(storage.root, "runs", name, "last-success.json")
    if not exists(uri, storage.options()):
        return None
    return json.loads(make_cache(storage).fetch(uri, storage.options()).path.read_text())


def record_success(name: str, storage: StorageConfig, record: Mapping[str, Any]) -> None:
    uri = join(storage.root, "runs", name, "last-success.json")
    _publish_file(uri, storage, make_cache(storage), lambda path: path.write_text(json.dumps(record, indent=2)))


def base_weights(base: ObjectRef) -> str:
    return join(base.uri, "model.safetensors")


def sparsify(spec: MergeSpec, base: ObjectRef, experts: Mapping[str, ObjectRef], storage: StorageConfig,
             device: str = "auto") -> tuple[ObjectRef, bool]:
    """The sparsify stage: a data-free method's global pass (TIES: per-expert top-k thresholds and the majority
    sign; DOGE TA: the selection and its thresholds), stored as `sparsify/<method>-<fingerprint>/state.json` and
    keyed by the base's and experts' digests and the params that pass reads, so a rerun or another scaling of the
    same density reuses it. Returns (its reference, whether it was reused)."""
    from mergeflow.methods import build_method
    from mergeflow.methods.base import MergeMethod

    method = build_method(spec.method, spec.params)  # its params with the defaults filled in
    params = method.params.model_dump(mode="json")
    if type(method).prepare is MergeMethod.prepare:  # no global pass (TA, averaging, DARE): one empty state
        read = {}
    else:
        read = params if method.prepare_params is None else {k: params[k] for k in method.prepare_params}
    key = fingerprint(spec.method, read, base.sha256, [(name, ref.sha256) for name, ref in experts.items()])
    uri = join(storage.root, "sparsify", f"{spec.method}-{key}")
    reused = exists(uri, storage.options())

    def build(staged: Path) -> None:
        state = _prepare(spec, base, experts, storage, device)
        (staged / "state.json").write_text(json.dumps({"method": spec.method, "params": read, "state": state}))

    return _publish_or_reuse(build, uri, storage, make_cache(storage)), reused


def read_sparsified(ref: ObjectRef, storage: StorageConfig) -> dict[str, Any]:
    """The method state a sparsify stage stored, after checking its digest."""
    return json.loads((local_directory(ref, storage, make_cache(storage)) / "state.json").read_text())["state"]


def _prepare(spec: MergeSpec, base: ObjectRef, experts: Mapping[str, ObjectRef], storage: StorageConfig,
             device: str) -> dict[str, Any]:
    from mergeflow.checkpoints import open_checkpoint
    from mergeflow.methods import build_method
    from mergeflow.task_vectors import ExpertPool, resolve_device

    cache = make_cache(storage)
    method = build_method(spec.method, spec.params)
    base_ckpt = open_checkpoint(base_weights(base), storage_options=storage.options(), cache=cache)
    ckpts = [open_checkpoint(ref.uri, storage_options=storage.options(), cache=cache) for ref in experts.values()]
    try:
        pool = ExpertPool(base_ckpt, ckpts, list(experts), resolve_device(device))
        return method.prepare(pool)
    finally:
        for ckpt in (base_ckpt, *ckpts):
            ckpt.close()


def needs_objective(spec: MergeSpec) -> bool:
    """Whether a method learns coefficients from unlabeled data (AdaMerging, DOGE AM)."""
    from mergeflow.methods import method_class

    return method_class(spec.method).needs_objective


def unlabeled_objective(base: ObjectRef, tasks: Mapping[str, tuple[ObjectRef, ObjectRef]], split: str,
                        evaluation: EvalConfig, storage: StorageConfig, device: str = "auto"):
    """The entropy objective over each task's unlabeled `split` inputs with its frozen head (labels never read)."""
    cache = make_cache(storage)
    splits = {name: (load_head(head, base, storage, cache),
                     read_task(name, dataset, base, storage, cache, [split]).splits[split])
              for name, (dataset, head) in tasks.items()}
    return family_of(base).objective(load_model(base, storage, cache, None, device), splits, evaluation)


def merge_experts(spec: MergeSpec, base: ObjectRef, experts: Mapping[str, ObjectRef], out_uri: str,
                  storage: StorageConfig, state: ObjectRef | None = None, device: str = "auto",
                  statistics: Mapping[str, ObjectRef] | None = None, objective=None
                  ) -> tuple[ObjectRef, dict[str, Any]]:
    """Merge the experts with one method into `out_uri` (with the sparsify stage's stored `state` when given);
    returns its reference and the engine's result record."""
    from mergeflow.merge import merge_checkpoints

    cache = make_cache(storage)
    if not exists(out_uri, storage.options()):
        state = read_sparsified(state, storage) if state is not None else None
        stats = [statistics[name].uri for name in experts] if statistics else None
        result = merge_checkpoints(spec.method, base_weights(base), [r.uri for r in experts.values()], out_uri,
                                   spec.params, device=device, storage_options=storage.options(), cache=cache,
                                   state=state, progress=True, statistics=stats, objective=objective)
        record = result.to_dict()
    else:
        record = json.loads(cache.fetch(join(out_uri, "mergeflow.json"), storage.options()).path.read_text())
    return fetch_checkpoint(out_uri, storage), record


def merge_part(spec: MergeSpec, base: ObjectRef, experts: Mapping[str, ObjectRef], out_uri: str, index: int,
               parts: int, storage: StorageConfig, state: ObjectRef | None = None, device: str = "auto",
               statistics: Mapping[str, ObjectRef] | None = None) -> str:
    """Merge layer group `index` of `parts` into `<out_uri>.parts/<index>` (reused when present); returns its URI."""
    from mergeflow.merge import merge_checkpoints

    part_uri = join(f"{out_uri.rstrip('/')}.parts", str(index))
    if not exists(out_uri, storage.options()) and not exists(part_uri, storage.options()):
        state = read_sparsified(state, storage) if state is not None else None
        stats = [statistics[name].uri for name in experts] if statistics else None
        merge_checkpoints(spec.method, base_weights(base), [r.uri for r in experts.values()], part_uri, spec.params,
                          device=device, storage_options=storage.options(), cache=make_cache(storage), state=state,
                          statistics=stats, part=(index, parts))
    return part_uri


def assemble_merge(part_uris: Sequence[str], out_uri: str, storage: StorageConfig
                   ) -> tuple[ObjectRef, dict[str, Any]]:
    """Join the parts into the merged model at `out_uri` and remove them; returns its reference and record."""
    from mergeflow.merge import assemble_parts

    cache = make_cache(storage)
    if not exists(out_uri, storage.options()):
        record = assemble_parts(part_uris, out_uri, storage_options=storage.options(), cache=cache).to_dict()
        fs, path = filesystem(f"{out_uri.rstrip('/')}.parts", storage.options())
        fs.rm(path, recursive=True)
    else:
        record = json.loads(cache.fetch(join(out_uri, "mergeflow.json"), storage.options()).path.read_text())
    return fetch_checkpoint(out_uri, storage), record


def evaluate_model(weights: ObjectRef | None, base: ObjectRef, tasks: Mapping[str, tuple[ObjectRef, ObjectRef]],
                   evaluation: EvalConfig, storage: StorageConfig, device: str = "auto", split: str = "test",
                   max_examples: int | None = None, state_dict: Mapping[str, Any] | None = None
                   ) -> dict[str, float]:
    """The primary metric (accuracy for classification) on each task's `split` (only that split is read; at most
    `max_examples` per task) with that task's frozen head; `weights=None` scores the pretrained model, or the
    in-memory `state_dict` when given. `tasks` maps task name to (dataset, head)."""
    family = family_of(base)
    cache = make_cache(storage)
    model = load_model(base, storage, cache, weights, device, state_dict)
    splits = {}
    for name, (dataset, head) in tasks.items():
        data = read_task(name, dataset, base, storage, cache, [split]).splits[split]
        if max_examples is not None:
            data = family.first(data, max_examples)
        splits[name] = (load_head(head, base, storage, cache), data)
    return family.evaluate(model, splits, evaluation)


def evaluate_stored(weights: ObjectRef | None, base: ObjectRef, tasks: Mapping[str, tuple[ObjectRef, ObjectRef]],
                    evaluation: EvalConfig, storage: StorageConfig, device: str = "auto", split: str = "test",
                    max_examples: int | None = None) -> tuple[dict[str, float], bool]:
    """`evaluate_model` of a stored model, with its scores kept under a key of the model's, every dataset's and
    head's digests and the settings (`evaluations/<fp>.json`), so an unchanged model is never scored twice.
    Returns (accuracy, reused)."""
    cache = make_cache(storage)
    model = weights or base
    fp = fingerprint(model.sha256, weights is None, {n: (d.sha256, h.sha256) for n, (d, h) in tasks.items()},
                     evaluation.model_dump(), split, max_examples)
    uri = join(storage.root, "evaluations", f"{fp}.json")
    if exists(uri, storage.options()):
        return json.loads(cache.fetch(uri, storage.options()).path.read_text())["accuracy"], True
    accuracy = evaluate_model(weights, base, tasks, evaluation, storage, device, split, max_examples)
    record = {"model": model.model_dump(), "split": split, "max_examples": max_examples, "accuracy": accuracy}
    _publish_file(uri, storage, cache, lambda path: path.write_text(json.dumps(record, indent=2)))
    return accuracy, False


_UPDATE_LOCKS: dict[str, threading.Lock] = {}
_UPDATE_LOCKS_GUARD = threading.Lock()


def _scaled_update(method: str, params: Mapping[str, Any], base: ObjectRef, experts: Mapping[str, ObjectRef],
                   storage: StorageConfig, device: str) -> Path:
    """A scaling method's update at lambda 1 (`mergeflow.sweep.scaled_update`), computed once per setting of its
    other parameters and kept in the local cache (an intermediate, never published)."""
    from mergeflow.checkpoints import open_checkpoint
    from mergeflow.sweep import scaled_update, update_key
    from mergeflow.task_vectors import ExpertPool, resolve_device

    cache = make_cache(storage)
    fp = fingerprint(method, update_key(method, params), base.sha256, [e.sha256 for e in experts.values()])
    path = cache.root / "updates" / f"{method}-{fp}.safetensors"
    with _UPDATE_LOCKS_GUARD:
        lock = _UPDATE_LOCKS.setdefault(str(path), threading.Lock())
    with lock:
        if not path.exists():
            base_ckpt = open_checkpoint(base_weights(base), storage_options=storage.options(), cache=cache)
            ckpts = [open_checkpoint(r.uri, storage_options=storage.options(), cache=cache) for r in experts.values()]
            try:
                pool = ExpertPool(base_ckpt, ckpts, list(experts), resolve_device(device))
                update = scaled_update(method, params, pool)
            finally:
                for ckpt in (base_ckpt, *ckpts):
                    ckpt.close()
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
            save_safetensors(update, partial)
            os.replace(partial, path)
    return path


def sweep_weights(method: str, params: Mapping[str, Any], base: ObjectRef, experts: Mapping[str, ObjectRef],
                  storage: StorageConfig, device: str = "auto") -> dict[str, Any]:
    """The merged state dict of one grid point, in memory: theta_0 + lambda U from the shared update for scaling
    methods, a full in-memory merge otherwise."""
    from safetensors.torch import load_file

    from mergeflow.checkpoints import open_checkpoint
    from mergeflow.merge import merge_pool
    from mergeflow.methods import build_method, method_class
    from mergeflow.sweep import apply_update
    from mergeflow.task_vectors import ExpertPool, resolve_device

    cache = make_cache(storage)
    scaling = method_class(method).scaling_param
    base_ckpt = open_checkpoint(base_weights(base), storage_options=storage.options(), cache=cache)
    try:
        if scaling is not None:
            base_sd = {key: base_ckpt.get(key) for key in base_ckpt.keys()}
            update = load_file(str(_scaled_update(method, params, base, experts, storage, device)))
            lam = build_method(method, params).params.model_dump()[scaling]
            return apply_update(base_sd, update, float(lam))
        ckpts = [open_checkpoint(r.uri, storage_options=storage.options(), cache=cache) for r in experts.values()]
        try:
            out: dict[str, Any] = {}
            pool = ExpertPool(base_ckpt, ckpts, list(experts), resolve_device(device))
            merge_pool(build_method(method, params), pool, out.__setitem__)
            return out
        finally:
            for ckpt in ckpts:
                ckpt.close()
    finally:
        base_ckpt.close()


def sweep_point(method: str, params: Mapping[str, Any], base: ObjectRef, experts: Mapping[str, ObjectRef],
                tasks: Mapping[str, tuple[ObjectRef, ObjectRef]], tuning: TuningConfig, evaluation: EvalConfig,
                storage: StorageConfig, device: str = "auto") -> tuple[dict[str, float], bool]:
    """Validation accuracy per task of one grid point (weights never published); the small score record is
    stored under a key of every input digest, the method and its parameters, so a rerun or a grown grid scores
    only new points. Returns (accuracy, reused)."""
    cache = make_cache(storage)
    fp = fingerprint(method, dict(params), base.sha256, {n: e.sha256 for n, e in experts.items()},
                     {n: (d.sha256, h.sha256) for n, (d, h) in tasks.items()}, tuning.max_examples,
                     evaluation.model_dump())
    uri = join(storage.root, "sweeps", f"{method}-{fp}.json")
    if exists(uri, storage.options()):
        return json.loads(cache.fetch(uri, storage.options()).path.read_text())["accuracy"], True
    weights = sweep_weights(method, params, base, experts, storage, device)
    accuracy = evaluate_model(None, base, tasks, evaluation, storage, device, split="validation",
                              max_examples=tuning.max_examples, state_dict=weights)
    record = {"method": method, "params": dict(params), "split": "validation", "accuracy": accuracy}
    _publish_file(uri, storage, cache, lambda path: path.write_text(json.dumps(record, indent=2)))
    return accuracy, False

