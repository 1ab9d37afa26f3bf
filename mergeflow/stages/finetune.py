"""Fine-tuning stages: an expert per task (stored under a fingerprint of everything that determines it, resumed
from its last checkpoint after a failure; with `finetune.lora` a PEFT LoRA adapter directory instead of a model)
and one task's model of an ATM round."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergeflow.checkpoints.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from mergeflow.checkpoints.safetensors_format import save_safetensors
from mergeflow.config import FinetuneConfig
from mergeflow.stages.refs import ObjectRef, atm_round_dir, checkpoints_uri, expert_uri, family_of
from mergeflow.stages.stage import Context, Located, Node, Stage
from mergeflow.stages.store import Store
from mergeflow.storage import join


def _fingerprinted(settings: FinetuneConfig) -> dict[str, Any]:
    """The settings that decide the trained weights (how often checkpoints are written does not; `lora` only
    where set, so every full fine-tuning keeps its location)."""
    return settings.model_dump(exclude={"checkpoint_every"})


def expert_location(task: str, base: ObjectRef, dataset: ObjectRef, head: ObjectRef, settings: FinetuneConfig,
                    root: str) -> str:
    """Where the expert fine-tuned from these inputs and settings is stored: its model.safetensors, or with LoRA
    its adapter directory."""
    return expert_uri(root, task, base, dataset, head, _fingerprinted(settings), adapter=settings.lora is not None)


def finetune_expert(task: str, base: ObjectRef, dataset: ObjectRef, head: ObjectRef, settings: FinetuneConfig,
                    store: Store, device: str = "auto", progress: bool = True
                    ) -> tuple[ObjectRef, dict[str, Any]]:
    """Fine-tune the encoder on the task's train split under its frozen head and store the expert.

    Returns the expert's reference and a report (losses, seconds; `reused` when a stored expert with the same
    fingerprint already existed and no training ran).
    """
    from mergeflow.finetune import FinetuneSettings

    uri = expert_location(task, base, dataset, head, settings, store.root)
    directory = uri.rsplit("/", 1)[0]
    report_uri = join(directory, "training.json")
    adapter = settings.lora is not None
    if store.exists(join(uri, ADAPTER_WEIGHTS) if adapter else uri):  # an adapter's weights are published last
        report = {"reused": True}
        if store.exists(report_uri):
            report.update(store.read_json(report_uri))
            report["reused"] = True
        return (store.checkpoint_ref(uri) if adapter else store.file_ref(uri)), report
    data = store.read_task(task, dataset, base, ["train"])
    model = store.load_model(base, None, device)
    checkpoints = checkpoints_uri(store.root, directory.rsplit("/", 1)[1])  # resumed by a retried task
    family = family_of(base)
    options = {"progress": progress, "checkpoint_dir": checkpoints if settings.checkpoint_every else None,
               "storage_options": store.options}
    trainer = FinetuneSettings(**settings.trainer_settings())
    if adapter:
        result, config = family.finetune_adapter(model, store.load_head(head, base), data.splits["train"], trainer,
                                                 settings.lora.model_dump(), **options)
    else:
        result = family.finetune(model, store.load_head(head, base), data.splits["train"], trainer, **options)
    report = {"losses": result.losses, "seconds": round(result.seconds, 2), "reused": False,
              "train_examples": family.split_size(data.splits["train"]), "resumed_from": result.resumed_from}
    metadata = {"format": "pt", "task": task, "base_sha256": base.sha256, "dataset_sha256": dataset.sha256,
                "head_sha256": head.sha256, "finetune": json.dumps(settings.model_dump())}

    def build(staged: Path) -> None:
        save_safetensors(result.state_dict, staged / "model.safetensors", metadata=metadata)
        (staged / "training.json").write_text(json.dumps(report))

    def build_adapter(staged: Path) -> None:
        (staged / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        save_safetensors(result.state_dict, staged / ADAPTER_WEIGHTS, metadata=metadata)

    if adapter:  # training.json beside the adapter directory, which is published whole after it
        store.publish_json(report_uri, report)
        store.publish_or_reuse(build_adapter, uri)  # a publish cut short is completed (storage.publish_directory)
    else:
        store.publish_or_reuse(build, directory)
    if settings.checkpoint_every and store.exists(checkpoints):  # the expert is published: drop them
        store.remove(checkpoints)
    return (store.checkpoint_ref(uri) if adapter else store.file_ref(uri)), report


def atm_finetune(task: str, base: ObjectRef, start: ObjectRef | None, dataset: ObjectRef, head: ObjectRef,
                 settings: FinetuneConfig, split: str, store: Store, device: str = "auto",
                 progress: bool = True) -> tuple[ObjectRef, dict[str, Any]]:
    """One ATM round of one task: fine-tune from `start` (a merged model; None: theta_0) on `split` with
    `settings` (the round's budget) and store the result (reused when every input is unchanged)."""
    from mergeflow.finetune import FinetuneSettings

    directory, fp = atm_round_dir(store.root, task, base, start, dataset, head, split, _fingerprinted(settings))
    uri = join(directory, "model.safetensors")
    if store.exists(uri):
        return store.file_ref(uri), {"reused": True}
    data = store.read_task(task, dataset, base, [split])
    model = store.load_model(base, start, device)
    result = family_of(base).finetune(model, store.load_head(head, base), data.splits[split],
                                      FinetuneSettings(**settings.trainer_settings()), progress=progress,
                                      checkpoint_dir=checkpoints_uri(store.root, f"atm-{task}-{fp}")
                                      if settings.checkpoint_every else None, storage_options=store.options)

    def build(staged: Path) -> None:
        save_safetensors(result.state_dict, staged / "model.safetensors",
                         metadata={"format": "pt", "task": task, "start_sha256": start.sha256 if start else "",
                                   "split": split, "finetune": json.dumps(settings.model_dump())})

    store.publish_or_reuse(build, directory)
    report = {"reused": False, "losses": result.losses, "seconds": round(result.seconds, 2)}
    return store.file_ref(uri), report


# ---------------------------------------------------------------------------------------- the plan's stages

def _expert_where(node: Node, ctx: Context) -> Located:
    n = node.task
    uri = expert_location(n, ctx.base, ctx.value(f"dataset:{n}"), ctx.value(f"head:{n}"), ctx.config.finetune,
                          ctx.store.root)
    return uri, lambda: ctx.store.checkpoint_ref(uri)


def _finetune(node: Node, ctx: Context) -> ObjectRef:
    n = node.task
    return finetune_expert(n, ctx.base, ctx.value(f"dataset:{n}"), ctx.value(f"head:{n}"), ctx.config.finetune,
                           ctx.store, ctx.device)[0]


STAGES = (Stage("finetune_expert", _expert_where, _finetune),)
