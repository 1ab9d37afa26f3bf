"""What flows between stages and where each stage's output lives: references (URI + sha256), fingerprints of
everything that decides an output, and the store layout (every output location is decided here).

Store layout under `storage.root`:
  base/<model>/                 a built-in pretrained model directory (config, tokenizer, model.safetensors)
                                (a user's base directory is read where it is: model.safetensors, or
                                model.safetensors.index.json and its shards)
  datasets/<task>-<fp>/         a built-in task's data in its family's layout
  heads/<task>-<fp>.<ext>       frozen head made from the pretrained model (linear probe, CLIP zero-shot head,
                                seq2seq prompt)
  experts/<task>-<fp>/model.safetensors  fine-tuned encoder (fp = digest of everything that determines it,
                                so a rerun with the same inputs finds and reuses it); statistics-<fp>.safetensors
                                beside it; with LoRA fine-tuning experts/<task>-<fp>/adapter/ (a PEFT adapter
                                directory: adapter_config.json, adapter_model.safetensors) in its place
  checkpoints/<expert-dir>/     fine-tuning checkpoints of an expert not yet published
  atm/<task>-<fp>/              one ATM round's fine-tuned model of a task
  sparsify/<method>-<fp>/       a method's global pass (state.safetensors)
  merged/<run>/<label>-<fp>/    merged checkpoints with provenance (and <...>.parts/<i> while split in parts)
  sweeps/<method>-<fp>.json     validation scores of one grid point (its weights are never stored)
  evaluations/<fp>.json         scores of one stored model on one split
  runs/<run>/last-success.json  what the last successful run of a config read
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

from mergeflow.families import Family, get_family
from mergeflow.storage import join

TaskInputs = Mapping[str, tuple["ObjectRef", "ObjectRef"]]  # task name -> (dataset, head)


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


def digests(refs: Mapping[str, ObjectRef]) -> dict[str, str]:
    return {name: ref.sha256 for name, ref in refs.items()}


def task_digests(tasks: TaskInputs) -> dict[str, tuple[str, str]]:
    return {name: (dataset.sha256, head.sha256) for name, (dataset, head) in tasks.items()}


def base_weights(base: ObjectRef, name: str = "model.safetensors") -> str:
    """The base directory's weights: `model.safetensors`, or for a sharded base (`Store.base_weights` decides)
    the index `model.safetensors.index.json`."""
    return join(base.uri, name)


def run_inputs_digest(config_json: Mapping[str, Any], base: ObjectRef, experts: Mapping[str, ObjectRef],
                      task_inputs: TaskInputs) -> str:
    """What decides a run's results: its config (but the run name) and the content digests of its base, experts,
    and each task's dataset and head (a dataset changed in place changes the digest)."""
    settings = {k: v for k, v in config_json.items() if k != "name"}
    return fingerprint(settings, base.sha256, dict(sorted(digests(experts).items())),
                       dict(sorted(task_digests(task_inputs).items())))


# ---------------------------------------------------------------------------------------------- locations


def builtin_model_uri(root: str, model: str) -> str:
    return join(root, "base", model)


def dataset_uri(root: str, task: str, sizes: Mapping[str, int], seed: int) -> str:
    return join(root, "datasets", f"{task}-{fingerprint(dict(sizes), seed)}")


def head_uri(root: str, task: str, base: ObjectRef, dataset: ObjectRef, max_length: int, suffix: str) -> str:
    return join(root, "heads", f"{task}-{fingerprint(base.sha256, dataset.sha256, max_length)}{suffix}")


def expert_uri(root: str, task: str, base: ObjectRef, dataset: ObjectRef, head: ObjectRef,
               settings: Mapping[str, Any], adapter: bool = False) -> str:
    """The expert's checkpoint, or with `adapter` its LoRA adapter directory; `settings` are the fine-tuning
    settings but `checkpoint_every`."""
    return join(root, "experts", f"{task}-{fingerprint(base.sha256, dataset.sha256, head.sha256, settings)}",
                "adapter" if adapter else "model.safetensors")


SHARE_MARK = "-share"  # in the name of statistics on a share of the examples (`statistics_uri`)


def checkpoints_uri(root: str, name: str) -> str:
    return join(root, "checkpoints", name)


def statistics_uri(expert: ObjectRef, dataset: ObjectRef, head: ObjectRef, kinds: tuple[str, ...],
                   settings: Mapping[str, Any], share: float = 1.0) -> str:
    """Beside the expert: statistics-<fp>.safetensors, or statistics-<fp>-share0.1.safetensors on a share of the
    examples (`auto`'s early rungs)."""
    fp = fingerprint(expert.sha256, dataset.sha256, head.sha256, kinds,
                     {**settings, **({"share": share} if share < 1 else {})})
    return join(expert.uri.rsplit("/", 1)[0], f"statistics-{fp}{SHARE_MARK}{share:g}.safetensors" if share < 1
                else f"statistics-{fp}.safetensors")


def atm_round_dir(root: str, task: str, base: ObjectRef, start: ObjectRef | None, dataset: ObjectRef,
                  head: ObjectRef, split: str, settings: Mapping[str, Any]) -> tuple[str, str]:
    """(directory, fingerprint) of one ATM round's fine-tuned model of `task`."""
    fp = fingerprint(base.sha256, start.sha256 if start else None, dataset.sha256, head.sha256, split, settings)
    return join(root, "atm", f"{task}-{fp}"), fp


def sparsify_uri(root: str, method: str, read_params: Mapping[str, Any], base: ObjectRef,
                 experts: Mapping[str, ObjectRef]) -> str:
    key = fingerprint(method, dict(read_params), base.sha256, [(name, ref.sha256) for name, ref in experts.items()])
    return join(root, "sparsify", f"{method}-{key}")


def subspace_uri(root: str, kind: str, base: ObjectRef, experts: Mapping[str, ObjectRef]) -> str:
    """The stored per-layer factors of `kind` for these experts (in this order) over this base."""
    from mergeflow.subspace import FORMAT_VERSION

    key = fingerprint(kind, FORMAT_VERSION, base.sha256, [(name, ref.sha256) for name, ref in experts.items()])
    return join(root, "subspace", f"{kind}-{key}")


def merged_uri(root: str, run: str, label: str, spec: Mapping[str, Any], base: ObjectRef,
               experts: Mapping[str, ObjectRef], statistics: Mapping[str, ObjectRef] | None = None,
               unlabeled: tuple[TaskInputs, str] | None = None) -> str:
    """A merged model of run `run`, keyed by its spec and everything it reads: experts and base, the statistics of
    a data-aware method, the task data and split a learned method reads."""
    fp = fingerprint(dict(spec), digests(experts), base.sha256,
                     digests(statistics) if statistics is not None else None,
                     task_digests(unlabeled[0]) if unlabeled else None, unlabeled[1] if unlabeled else None)
    return join(root, "merged", run, f"{label}-{fp}")


def atm_merged_uri(root: str, run: str, round_index: int, merge_spec: Mapping[str, Any], current: ObjectRef,
                   round_experts: Mapping[str, ObjectRef]) -> str:
    fp = fingerprint(dict(merge_spec), current.sha256, digests(round_experts))
    return join(root, "merged", run, f"atm-round{round_index}-{fp}")


def part_uri(out_uri: str, index: int) -> str:
    return join(parts_prefix(out_uri), str(index))


def parts_prefix(out_uri: str) -> str:
    return f"{out_uri.rstrip('/')}.parts"


def sweep_uri(root: str, method: str, params: Mapping[str, Any], base: ObjectRef, experts: Mapping[str, ObjectRef],
              tasks: TaskInputs, max_examples: int | None, evaluation: Mapping[str, Any],
              statistics: Mapping[str, ObjectRef] | None = None) -> str:
    """A grid point's validation scores (format 2: with each example's credit), keyed by everything the point reads
    (statistics: data-aware methods)."""
    fp = fingerprint(method, dict(params), base.sha256, digests(experts), task_digests(tasks), max_examples,
                     dict(evaluation), *([digests(statistics)] if statistics else []), {"format": 2})
    return join(root, "sweeps", f"{method}-{fp}.json")


def evaluation_uri(root: str, model: ObjectRef, pretrained: bool, tasks: TaskInputs, evaluation: Mapping[str, Any],
                   split: str, max_examples: int | None) -> str:
    fp = fingerprint(model.sha256, pretrained, task_digests(tasks), dict(evaluation), split, max_examples)
    return join(root, "evaluations", f"{fp}.json")


def last_success_uri(root: str, run: str) -> str:
    return join(root, "runs", run, "last-success.json")
