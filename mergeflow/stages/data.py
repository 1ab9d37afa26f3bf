"""Data stages: a task's dataset (a built-in task's real data stored once, or the user's directory checked and
referenced by digest) and its frozen head (the user's file, or one made from the pretrained model)."""

from __future__ import annotations

from pathlib import Path

from mergeflow.config import DataConfig, EvalConfig
from mergeflow.errors import ConfigError, ObjectNotFoundError
from mergeflow.families import get_family
from mergeflow.stages.refs import ObjectRef, dataset_uri, family_of, head_uri
from mergeflow.stages.stage import Context, Located, Node, Stage
from mergeflow.stages.store import Store
from mergeflow.storage import directory_digest


def dataset_location(task: str, data: DataConfig, root: str) -> str:
    """Where a built-in task's dataset is stored (a user's dataset stays where it is)."""
    sizes = {"probe_per_class": data.probe_per_class, "train": data.train, "validation": data.validation,
             "test": data.test}
    return dataset_uri(root, task, sizes, data.seed)


def head_location(task: str, base: ObjectRef, dataset: ObjectRef, evaluation: EvalConfig, root: str) -> str:
    """Where the head made from the pretrained model is stored (a user's head file stays where it is)."""
    return head_uri(root, task, base, dataset, evaluation.max_length, family_of(base).head_suffix)


def prepare_dataset(task: str, data: DataConfig, store: Store, dataset: str | None = None,
                    family: str = "hf_text", field: str | None = None) -> ObjectRef:
    """Read a built-in task's real data, split it, and store it in its family's layout; or check a user's dataset
    directory (`dataset`, used where it is) and reference it by its content digest (errors name config `field`,
    default `tasks[<task>].dataset`)."""
    reader = get_family(family)
    if dataset is not None:
        field = field or f"tasks[{task}].dataset"
        path, files = store.input_directory(dataset, field, recursive=True)
        try:
            reader.read_dataset(path, task, splits=[])  # the layout, before any model runs
        except ConfigError as exc:
            raise ConfigError(f"{field}: {dataset}: {exc}") from None
        return ObjectRef(uri=dataset, sha256=directory_digest(files))
    sizes = {"probe_per_class": data.probe_per_class, "train": data.train, "validation": data.validation,
             "test": data.test}

    def build(staged: Path) -> None:
        reader.write_builtin_dataset(task, sizes, data.seed, store.cache.root / "wheels", staged)

    return store.publish_or_reuse(build, dataset_location(task, data, store.root))


def fit_head(task: str, base: ObjectRef, dataset: ObjectRef, evaluation: EvalConfig, store: Store,
             device: str = "auto", head: str | None = None, field: str | None = None) -> ObjectRef:
    """The task's frozen head: the user's file `head` (checked against the task's classes; errors name config
    `field`, default `tasks[<task>].head`), or one made from the pretrained model by its family (a linear probe on
    the probe split, a CLIP zero-shot head, a seq2seq prompt)."""
    from mergeflow.task_vectors import resolve_device

    family = family_of(base)
    if head is not None:
        field = field or f"tasks[{task}].head"
        try:
            local = store.fetch(head)
        except (FileNotFoundError, ObjectNotFoundError):
            raise ConfigError(f"{field}: {head} not found") from None
        field = f"{field} ({head})"
        family.check_head(family.load_head(local.path, field), store.read_task(task, dataset, base, splits=[]), field)
        return ObjectRef(uri=head, sha256=local.sha256)
    uri = head_location(task, base, dataset, evaluation, store.root)
    if not store.exists(uri):
        data = store.read_task(task, dataset, base)
        model_dir = store.local_directory(base)
        store.publish_file(uri, lambda path: family.build_head(data, model_dir, evaluation, resolve_device(device),
                                                               path))
    return store.file_ref(uri)


def validation_overlap(task: str, dataset: ObjectRef, base: ObjectRef, store: Store) -> dict[str, int]:
    """How many of the task's validation examples also appear (by input content) in its train split: {"validation":
    count, "in_train": overlap, "positions": theirs in the validation split} (a dataset without a train split
    overlaps nothing)."""
    from mergeflow.hygiene import overlap

    family = family_of(base)
    data = store.read_task(task, dataset, base, ["validation"]).splits["validation"]
    try:
        train = store.read_task(task, dataset, base, ["train"]).splits["train"]
    except ConfigError:
        return {"validation": family.split_size(data), "in_train": 0, "positions": []}
    found = overlap(task, family.input_digests(train), family.input_digests(data))
    return {"validation": found.validation, "in_train": found.in_train, "positions": list(found.positions)}


# ---------------------------------------------------------------------------------------- the plan's stages

def _dataset_where(node: Node, ctx: Context) -> Located:
    given = ctx.task_configs[node.task].dataset
    uri = given or dataset_location(node.task, ctx.config.data, ctx.store.root)
    return uri, lambda: ctx.store.directory_ref(uri, recursive=bool(given))


def _prepare_dataset(node: Node, ctx: Context) -> ObjectRef:
    return prepare_dataset(node.task, ctx.config.data, ctx.store, ctx.task_configs[node.task].dataset,
                           ctx.config.model.family)


def _head_where(node: Node, ctx: Context) -> Located:
    given = ctx.task_configs[node.task].head
    if given:
        return given, lambda: ObjectRef(uri=given, sha256=ctx.store.fetch(given).sha256)
    uri = head_location(node.task, ctx.base, ctx.value(f"dataset:{node.task}"), ctx.config.evaluation,
                        ctx.store.root)
    return uri, lambda: ctx.store.file_ref(uri)


def _fit_head(node: Node, ctx: Context) -> ObjectRef:
    return fit_head(node.task, ctx.base, ctx.value(f"dataset:{node.task}"), ctx.config.evaluation, ctx.store,
                    ctx.device, ctx.task_configs[node.task].head)


def _check_overlap(node: Node, ctx: Context) -> dict[str, dict[str, int]]:
    """Each task's validation examples also in its train split, with a warning printed where any are."""
    from mergeflow.hygiene import overlap_warning

    found = {name: validation_overlap(name, dataset, ctx.base, ctx.store) for name, (dataset, _) in ctx.tasks.items()}
    if warning := overlap_warning(found):
        print(warning)
    return found


STAGES = (Stage("prepare_dataset", _dataset_where, _prepare_dataset), Stage("fit_head", _head_where, _fit_head),
          Stage("check_overlap", None, _check_overlap))
