"""Fine-tune an encoder under a frozen classification head: one expert per task, seeded and deterministic. A model
family supplies the data (`TrainingData`: labels, a differentiable forward of a batch, a digest); this trainer
owns the recipe.

AdamW with linear warmup then cosine decay (or a constant rate), gradient accumulation, fp32 or bf16 autocast, and
batches sampled with a seeded generator; the head never changes, so what the expert learns lives entirely in the
encoder's weights (its task vector).

With a `checkpoint_dir` (a local path or an fsspec URI such as s3://bucket/prefix/run-key) the trainer writes one
`checkpoint.pt` every `checkpoint_every` optimizer steps, atomically, and a later call with the same settings and data
resumes from it. The batch order is a pure function of the seed and the RNG state is restored, so on CPU a resumed run
ends with bit-identical weights and losses to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergeflow.heads import ClassificationHead
from mergeflow.progress import progress_bar
from mergeflow.storage import exists, filesystem, is_remote, join, local_path, storage_error, upload_file

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "mergeflow-finetune-checkpoint/1"
# Settings that do not change the trained weights: a run may resume with other values of these.
_RESUMABLE_ACROSS = frozenset({"checkpoint_every"})

Schedule = Literal["cosine", "constant"]
Precision = Literal["auto", "fp32", "bf16"]


@dataclass(frozen=True)
class FinetuneSettings:
    """Defaults fit the CPU demo: 100 steps of 16 x 64 tokens take 50-75 s on 2 cores (MiniLM).

    `steps` counts optimizer steps; each takes `grad_accumulation` micro-batches of `batch_size` texts. `schedule`:
    linear warmup over `warmup_steps`, then cosine decay to 0 at `steps` or a constant `lr`. `precision`: "auto" is
    bf16 autocast on CUDA and fp32 elsewhere (weights and optimizer state stay fp32 either way). `checkpoint_every`:
    optimizer steps between checkpoints (0: none; only used with a checkpoint directory).
    """

    steps: int = 100
    batch_size: int = 16
    lr: float = 5e-5
    weight_decay: float = 0.1
    warmup_steps: int = 10
    max_length: int = 64
    grad_clip: float = 1.0
    seed: int = 0
    schedule: Schedule = "cosine"
    grad_accumulation: int = 1
    checkpoint_every: int = 0
    precision: Precision = "auto"

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.max_length < 2 or self.warmup_steps < 0:
            raise ValueError(f"invalid fine-tuning settings: {self}")
        if self.grad_accumulation < 1 or self.checkpoint_every < 0 or not self.grad_clip > 0:
            raise ValueError(f"invalid fine-tuning settings: {self} (grad_accumulation must be >= 1, "
                             "checkpoint_every >= 0, grad_clip > 0)")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"invalid fine-tuning schedule {self.schedule!r}: expected 'cosine' or 'constant'")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"invalid fine-tuning precision {self.precision!r}: expected 'auto', 'fp32' or 'bf16'")


@dataclass
class FinetuneResult:
    state_dict: dict[str, Tensor]  # as from encoder_state_dict: same keys, shapes and dtypes as the base checkpoint
    losses: list[float]  # training loss per optimizer step (mean over its grad_accumulation * batch_size texts)
    seconds: float  # wall time of this call (a resumed run counts only its own part)
    resumed_from: int = 0  # the checkpoint's step this call resumed from; 0 when it started fresh
    learning_rates: list[float] = field(default_factory=list)  # learning rate of each optimizer step


def lr_factor(step: int, settings: FinetuneSettings) -> float:
    """Multiplier of `settings.lr` at optimizer step `step` (0-based)."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    if settings.schedule == "constant":
        return 1.0
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _batches(size: int, settings: FinetuneSettings) -> list[Tensor]:
    """`steps * grad_accumulation` micro-batches of indices: seeded permutations of the split, one after another.
    A pure function of the settings, so a resumed run skips exactly the micro-batches already consumed."""
    generator = torch.Generator().manual_seed(settings.seed)
    needed = settings.steps * settings.grad_accumulation * settings.batch_size
    order = torch.cat([torch.randperm(size, generator=generator) for _ in range(math.ceil(needed / size))])
    return list(order[:needed].split(settings.batch_size))


def _to_cpu(value: Any) -> Any:
    """`value` with every tensor moved to the CPU (dicts, lists and tuples rebuilt), for a device-free payload."""
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(item) for item in value)
    return value


def checkpoint_uri(checkpoint_dir: str) -> str:
    """Where the trainer keeps its (single, latest) checkpoint inside `checkpoint_dir`."""
    return join(checkpoint_dir, CHECKPOINT_NAME)


def write_checkpoint(payload: Mapping[str, Any], uri: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write `payload` with torch.save so that `uri` is replaced all at once: locally through a temporary file in the
    same folder and os.replace; remotely staged in a local temporary file, then published with `upload_file` (a
    verified temporary key, then the final one). A crash mid-write leaves the previous checkpoint in place."""
    if not is_remote(uri):
        final = local_path(uri).absolute()
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.partial-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as file:
                torch.save(dict(payload), file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return
    handle, name = tempfile.mkstemp(prefix="mergeflow-checkpoint-", suffix=".pt")
    os.close(handle)
    staged = Path(name)
    try:
        torch.save(dict(payload), staged)
        upload_file(staged, uri, storage_options, overwrite=True)
    finally:
        staged.unlink(missing_ok=True)


def read_checkpoint(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The checkpoint at `uri` loaded with `weights_only=True` onto the CPU, or None when there is none."""
    if not exists(uri, storage_options):
        return None
    fs, path = filesystem(uri, storage_options)
    try:
        with fs.open(path, "rb") as file:
            data = file.read()
    except Exception as exc:  # noqa: BLE001 - classified into input vs transient errors
        raise storage_error(uri, exc, "reading the checkpoint") from exc
    payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{uri} is not a Mergeflow fine-tuning checkpoint ({CHECKPOINT_FORMAT})")
    return payload


def _check_resumable(payload: Mapping[str, Any], settings: FinetuneSettings, data_sha256: str, uri: str) -> None:
    """ValueError naming every setting (or the data) that differs between the checkpoint and this call."""
    saved, current = dict(payload["settings"]), dataclasses.asdict(settings)
    differing = [f"{name}={saved.get(name, '<missing>')!r} in the checkpoint, {current.get(name, '<missing>')!r} now"
                 for name in sorted(set(saved) | set(current))
                 if name not in _RESUMABLE_ACROSS and saved.get(name) != current.get(name)]
    if payload["data_sha256"] != data_sha256:
        differing.append("data: the training split differs from the checkpoint's")
    if differing:
        raise ValueError(f"cannot resume from {uri}: it was written with different fine-tuning settings: "
                         + "; ".join(differing) + " (use the same settings, or another checkpoint_dir)")


def _autocast_dtype(settings: FinetuneSettings, device: torch.device) -> torch.dtype | None:
    """bf16 when asked for, or on CUDA under "auto"; None for fp32."""
    if settings.precision == "bf16" or (settings.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """Autocast to `dtype` on `device` (weights stay fp32; the loss is computed in fp32), or nothing for fp32."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def _seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Dropout draws from the global generators: seed them for the run and restore the caller's afterwards."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def _rng_state(device: torch.device) -> dict[str, Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":  # CUDA only: dropout on the GPU draws from the device's generator
        state["cuda"] = torch.cuda.get_rng_state(device).cpu()
    return state


def _set_rng_state(state: Mapping[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:  # CUDA only
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass(frozen=True)
class TrainingData:
    """What the trainer needs from a model family: how many examples, their labels, the features of a batch of
    example indices (the encoder's forward, differentiable), and a digest of the data (a checkpoint is never
    resumed on other data)."""

    size: int
    labels: Tensor
    features: Callable[[Tensor], Tensor]
    sha256: str


def _accumulate_gradients(data: TrainingData, head: ClassificationHead, micro_batches: list[Tensor],
                          settings: FinetuneSettings, device: torch.device) -> float:
    """Forward and backward over one optimizer step's micro-batches; returns the step's loss.

    Each micro-batch's mean loss is divided by their number, so equal micro-batches add up to the mean over the whole
    effective batch: k micro-batches of b examples give the gradient of one batch of k*b (up to float rounding).
    """
    autocast_dtype = _autocast_dtype(settings, device)
    total = 0.0
    for batch in micro_batches:
        with _autocast(device, autocast_dtype):
            features = data.features(batch)
            loss = F.cross_entropy(head.logits(features), data.labels[batch].to(device)) / len(micro_batches)
        loss.backward()
        total += loss.item()
    return total


def train_classifier(
    encoder: nn.Module,
    head: ClassificationHead,
    data: TrainingData,
    settings: FinetuneSettings,
    weights: Callable[[], dict[str, Tensor]],
    *,
    device: torch.device,
    progress: bool = True,
    checkpoint_dir: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> FinetuneResult:
    """The recipe behind `finetune_encoder` for any model family: AdamW (no decay on 1-D tensors), warmup then
    cosine or constant, accumulation, clipping, checkpoints and resume; returns `weights()` at the end."""
    start = time.perf_counter()
    device = torch.device(device)
    encoder.to(device).train()
    parameters = [p for p in encoder.parameters() if p.requires_grad]
    # The usual BERT recipe: no weight decay on biases and LayerNorm weights (the 1-D tensors).
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in parameters if p.ndim >= 2], "weight_decay": settings.weight_decay},
            {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=settings.lr,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, settings))
    uri = checkpoint_uri(checkpoint_dir) if checkpoint_dir is not None else None
    data_sha256 = data.sha256
    saved = read_checkpoint(uri, storage_options) if uri is not None else None
    if saved is not None:
        _check_resumable(saved, settings, data_sha256, uri)
    micro_batches = _batches(data.size, settings)
    per_step = settings.grad_accumulation
    step = 0
    losses: list[float] = []
    learning_rates: list[float] = []
    with _seeded_rng(settings.seed, device):
        if saved is not None:
            encoder.load_state_dict(saved["encoder"], strict=True)
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            _set_rng_state(saved["rng"], device)
            step, losses, learning_rates = int(saved["step"]), list(saved["losses"]), list(saved["learning_rates"])
        resumed_from = step
        with progress_bar(total=settings.steps, initial=step, desc="fine-tune", disable=not progress) as bar:
            while step < settings.steps:
                learning_rates.append(optimizer.param_groups[0]["lr"])
                optimizer.zero_grad(set_to_none=True)
                losses.append(_accumulate_gradients(data, head, micro_batches[step * per_step : (step + 1) * per_step],
                                                    settings, device))
                torch.nn.utils.clip_grad_norm_(parameters, settings.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if uri is not None and settings.checkpoint_every and step % settings.checkpoint_every == 0:
                    payload = {
                        "format": CHECKPOINT_FORMAT,
                        "step": step,
                        "settings": dataclasses.asdict(settings),
                        "data_sha256": data_sha256,
                        "losses": list(losses),
                        "learning_rates": list(learning_rates),
                        "encoder": _to_cpu(encoder.state_dict()),
                        "optimizer": _to_cpu(optimizer.state_dict()),
                        "scheduler": _to_cpu(scheduler.state_dict()),
                        "rng": _rng_state(device),
                    }
                    write_checkpoint(payload, uri, storage_options)
    encoder.eval()
    return FinetuneResult(weights(), losses, time.perf_counter() - start, resumed_from, learning_rates)
