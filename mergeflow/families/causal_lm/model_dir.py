"""Causal-LM model directories: checking, loading and writing Hugging Face `AutoModelForCausalLM` folders.

A model directory holds `config.json` (any `model_type` that `AutoModelForCausalLM` builds: llama, qwen2, mistral,
gpt2, ...), the tokenizer files (`tokenizer.json`, or `tokenizer.model`, or `vocab.json` + `merges.txt`) and the
weights: `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` listed in `model.safetensors.index.json`.

Checkpoint names are the model's own state-dict names with each tied tensor once (GPT-2's `lm_head.weight` is
`transformer.wte.weight`; the first name in state-dict order is kept), so a base written by `save_pretrained`, an
expert written by the family's trainer and a merge of them hold the same names. Models are built in the dtype of
their weights (a bf16 checkpoint stays bf16), and `causal_lm_state_dict` hands back every tensor in the dtype given.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mergeflow.checkpoints.reader import SAFETENSORS_INDEX, TensorInfo
from mergeflow.checkpoints.safetensors_format import DTYPES, decode_header
from mergeflow.checkpoints.writer import ShardedSafetensorsWriter
from mergeflow.errors import CheckpointError, ConfigError
from mergeflow.families.base import listed_keys

WEIGHTS_NAME = "model.safetensors"
TOKENIZER_LAYOUTS = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))
LAYOUT = ("a Hugging Face causal-LM folder: config.json, tokenizer files (tokenizer.json, tokenizer.model or "
          "vocab.json + merges.txt), model.safetensors or model.safetensors.index.json with its shards")


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


# ---------------------------------------------------------------------------------------------- checks


def read_config(directory: Path, label: str) -> Any:
    """The `PretrainedConfig` of `directory/config.json`; ConfigError naming `label`, the file and the field when it
    is missing, not JSON, or not a model type `AutoModelForCausalLM` builds."""
    _offline()
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{label}: no config.json in the model directory ({LAYOUT})")
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"{label}: config.json: not valid JSON: {exc}") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        known = ", ".join(t for t in ("llama", "qwen2", "mistral", "gpt2") if t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
        raise ConfigError(f"{label}: config.json: field 'model_type' is {model_type!r}, not a causal language model "
                          f"(AutoModelForCausalLM builds {known} and {len(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) - 4} "
                          "other types)")
    try:
        return AutoConfig.from_pretrained(directory)
    except (ValueError, TypeError, KeyError, OSError) as exc:
        raise ConfigError(f"{label}: config.json: not a valid {model_type} config: {exc}") from None


def _model_class(config: Any) -> type[nn.Module]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


def canonical_names(model: nn.Module) -> dict[str, str]:
    """Every state-dict name -> the first name (in state-dict order) of the tensor object it is (tied weights are
    one Parameter under several names; works on the meta device too)."""
    first: dict[int, str] = {}
    return {name: first.setdefault(id(tensor), name) for name, tensor in model.state_dict(keep_vars=True).items()}


def meta_model(config: Any) -> nn.Module:
    """The architecture of `config` on the meta device (no memory, no initialisation): names, shapes and ties."""
    with torch.device("meta"):
        return _model_class(config)._from_config(config)


def weight_files(directory: Path, label: str) -> list[Path]:
    """The weight files of a model directory: `model.safetensors`, or every shard its index lists (each checked to
    exist). ConfigError naming `label` and the file at fault."""
    directory = Path(directory)
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{label}: {index.name}: not a sharded-checkpoint index (a JSON object with a "
                              f"'weight_map' of tensor name -> shard file): {exc}") from None
        missing = [name for name in shards if not (directory / name).is_file()]
        if missing:
            raise ConfigError(f"{label}: {index.name} lists shard {missing[0]}, which is not in the model directory")
        return [directory / name for name in shards]
    if (directory / WEIGHTS_NAME).is_file():
        return [directory / WEIGHTS_NAME]
    raise ConfigError(f"{label}: no {WEIGHTS_NAME} or {SAFETENSORS_INDEX} in the model directory ({LAYOUT})")


def read_headers(files: list[Path], label: str) -> dict[str, TensorInfo]:
    """Name -> (shape, dtype) of every tensor in the safetensors `files` (headers only, no tensor data)."""
    infos: dict[str, TensorInfo] = {}
    for path in files:
        try:
            with open(path, "rb") as file:
                _, header = decode_header(file.read(8), file.read)
            header.pop("__metadata__", None)
            for name, entry in header.items():
                infos[name] = TensorInfo(name, tuple(int(d) for d in entry["shape"]), DTYPES[entry["dtype"]])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{label}: {path.name}: not a safetensors file: {exc}") from None
    return infos


def check_weights(model: nn.Module, infos: Mapping[str, TensorInfo], source: str) -> None:
    """CheckpointError naming `source` (and the tensor) when the weights do not fit `model` exactly: a name the
    model lacks, a tensor missing (a tied name may stand for its partner), or a shape that differs."""
    canonical = canonical_names(model)
    own = model.state_dict(keep_vars=True)
    groups: dict[str, list[str]] = {}
    for name, first in canonical.items():
        groups.setdefault(first, []).append(name)
    unexpected = sorted(set(infos) - set(own))
    missing = sorted(first for first, names in groups.items() if not any(name in infos for name in names))
    if missing or unexpected:
        raise CheckpointError(source, f"weights do not fit the model of config.json: missing {listed_keys(missing)}, "
                                      f"unexpected {listed_keys(unexpected)}", tensor=(missing or unexpected)[0])
    for name, info in infos.items():
        if tuple(info.shape) != tuple(own[name].shape):
            raise CheckpointError(source, f"shape {tuple(info.shape)}, but the model of config.json has "
                                          f"{tuple(own[name].shape)}", tensor=name)


def check_model_dir(directory: Path, label: str, *, weights: bool = True) -> None:
    """ConfigError (or CheckpointError) naming `label` and the file or field at fault when `directory` is not a
    causal-LM folder (`LAYOUT`); `weights=False`: the weights may be absent (they come from elsewhere)."""
    directory = Path(directory)
    config = read_config(directory, label)
    if not any(all((directory / name).is_file() for name in names) for names in TOKENIZER_LAYOUTS):
        raise ConfigError(f"{label}: no tokenizer files in the model directory (tokenizer.json, tokenizer.model, or "
                          "vocab.json with merges.txt)")
    if not weights:
        return
    files = weight_files(directory, label)
    source = f"{label}: {files[0].name if len(files) == 1 else 'the shards of ' + SAFETENSORS_INDEX}"
    check_weights(meta_model(config), read_headers(files, label), source)


# ---------------------------------------------------------------------------------------------- loading


def dominant_dtype(infos: Mapping[str, TensorInfo] | Mapping[str, Tensor]) -> torch.dtype:
    """The floating dtype holding most of the weights' elements (float32 when none is floating)."""
    counts: Counter[torch.dtype] = Counter()
    for value in infos.values():
        numel = 1
        for d in value.shape:
            numel *= d
        if value.dtype.is_floating_point:
            counts[value.dtype] += numel
    return counts.most_common(1)[0][0] if counts else torch.float32


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX-512 BF16 or AMX: oneDNN's own check)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def for_inference(model: nn.Module) -> nn.Module:
    """`model` in the dtype it scores fastest in: half-precision weights on a CPU without native bf16 matrix
    products are cast to fp32 in place, one parameter at a time (on this project's AVX2 VM a [512, 2048] x
    [5632, 2048] linear runs at 10.8 GFLOPS in bf16 and 82.1 in fp32, benchmarks/bf16_matmul.py; fp32 sums are also
    the more exact); on a GPU or a CPU with bf16 units it is left as it is. For a model loaded to be scored
    (training keeps its own dtypes)."""
    param = next(model.parameters(), None)
    if param is None or param.device.type != "cpu" or param.dtype not in (torch.bfloat16, torch.float16):
        return model
    if param.dtype == torch.bfloat16 and native_bf16():
        return model
    return model.float()


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """transformers' per-load progress bar off while loading (the caller's setting restored)."""
    from transformers.utils import logging as hf_logging

    was_disabled = hf_logging.is_progress_bar_enabled() is False
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not was_disabled:
            hf_logging.enable_progress_bar()


def load_causal_lm(model_dir: Path, state_dict: Mapping[str, Tensor] | None = None,
                   device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """The model of `model_dir/config.json` with the directory's weights (single file or shards) or `state_dict`
    (checkpoint names), checked strictly first (`check_weights`), built in the weights' dtype; and the directory's
    tokenizer. Offline; eval mode on `device`. A tied name present with other values than its partner is untied
    (as transformers does). The model holds `state_dict`'s tensors themselves where dtype and device match (no
    copy: one model in memory)."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    label = str(model_dir)
    config = read_config(model_dir, label)
    model_class = _model_class(config)
    if state_dict is None:
        files = weight_files(model_dir, label)
        infos = read_headers(files, label)
        check_weights(meta_model(config), infos, str(files[0] if len(files) == 1 else model_dir / SAFETENSORS_INDEX))
        with _quiet_loading():
            model = model_class.from_pretrained(model_dir, config=config, dtype=dominant_dtype(infos))
    else:
        check_weights(meta_model(config), {k: TensorInfo(k, tuple(v.shape), v.dtype) for k, v in state_dict.items()},
                      f"<state dict for {model_dir}>")
        with _quiet_loading():
            model = model_class.from_pretrained(None, config=config, state_dict=dict(state_dict),
                                                dtype=dominant_dtype(state_dict))
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{label}: the tokenizer files do not load: {exc}") from None
    return model.to(device).eval(), tokenizer


# ---------------------------------------------------------------------------------------------- writing


def causal_lm_state_dict(model: nn.Module, dtypes: Mapping[str, torch.dtype] | None = None) -> dict[str, Tensor]:
    """The model's checkpoint: CPU contiguous copies, each tied tensor once (under its first state-dict name),
    keys sorted; `dtypes` (name -> dtype) casts tensors back, e.g. to the bf16 of a base trained in fp32."""
    state = model.state_dict()
    kept = sorted(name for name, first in canonical_names(model).items() if name == first)
    dtypes = dtypes or {}
    return {name: state[name].detach().to("cpu", dtypes.get(name, state[name].dtype), copy=True).contiguous()
            for name in kept}


def save_causal_lm_dir(model: nn.Module, tokenizer: Any, directory: Path, *, shard_size: int | str = "2GB") -> None:
    """Write config.json (and generation_config.json), the tokenizer files and the weights
    (`causal_lm_state_dict`): one `model.safetensors`, or shards of at most `shard_size` bytes with their index,
    which `load_causal_lm` and `from_pretrained` read back."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    state = causal_lm_state_dict(model)
    writer = ShardedSafetensorsWriter(directory, [TensorInfo(k, tuple(v.shape), v.dtype) for k, v in state.items()],
                                      shard_size=shard_size, metadata={"format": "pt"})
    try:
        for name, tensor in state.items():
            writer.write(name, tensor)
    except BaseException:
        writer.abort()
        raise
    writer.close()
