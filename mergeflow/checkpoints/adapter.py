"""PEFT LoRA adapters as experts: a directory with `adapter_config.json` and `adapter_model.safetensors`, read
over the base it was trained from. Its task vector is scale * B @ A per target module (scale = lora_alpha / r, or
/ sqrt(r) with rsLoRA; per-module `rank_pattern` / `alpha_pattern`; transposed for `fan_in_fan_out`), formed one
tensor at a time when read, never as a dense copy of the model; tensors the adapter saves whole (`modules_to_save`,
biases) replace the base's; every other tensor is the base's (a zero task vector). Every adapter tensor is matched
to a base tensor, and its shapes checked, when the adapter is opened."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from mergeflow.checkpoints.reader import Checkpoint, TensorInfo, TensorSource, open_checkpoint
from mergeflow.errors import CheckpointError
from mergeflow.storage import filesystem, join

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.weight)?$")


def is_adapter(uri: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether `uri` is a directory holding a PEFT adapter config."""
    if uri.lower().endswith((".safetensors", ".json", ".bin", ".pt", ".pth")):
        return False
    fs, path = filesystem(uri, storage_options)
    try:
        return fs.isdir(path) and fs.exists(f"{path.rstrip('/')}/{ADAPTER_CONFIG}")
    except Exception:  # noqa: BLE001 - an unreachable location is reported by the checkpoint reader
        return False


def _pattern_value(module: str, patterns: Mapping[str, Any], default: Any) -> Any:
    """PEFT's per-module override: the first pattern that matches the end of the module's name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


class LoraExpert:
    """A LoRA adapter seen as a full checkpoint over `base` (the `TensorSource` protocol): the base's keys, shapes
    and dtypes; `get` returns W0 + delta, `task_vector` the delta itself (exact: scale * B @ A in fp32)."""

    def __init__(self, uri: str, base: TensorSource, config: Mapping[str, Any], adapter: Checkpoint,
                 config_sha256: str):
        self.uri = self.label = uri
        self.base, self.config, self.adapter = base, dict(config), adapter
        self.files = {ADAPTER_CONFIG: config_sha256, **{n: o.sha256 for n, o in adapter.files.items()}}
        self.lora: dict[str, tuple[str, str, float, bool]] = {}  # base tensor -> (A key, B key, scale, embedding)
        self.whole: dict[str, str] = {}  # base tensor -> adapter key of its replacement
        self._index()

    @property
    def digest(self) -> str:
        """sha256 of the sorted (file name, sha256) list of the config and the weights (`adapter_digest`)."""
        lines = "".join(f"{name} {sha}\n" for name, sha in sorted(self.files.items()))
        return hashlib.sha256(lines.encode()).hexdigest()

    def _base_key(self, module: str, suffix: str, adapter_key: str) -> str:
        """The base tensor `<module>.<suffix>` names: exact, or with leading components of the PEFT path dropped
        (an adapter trained on a task model, e.g. `bert.encoder...`, over a bare encoder's `encoder...`), or with a
        prefix the base has and the adapter lacks; exactly one must match."""
        keys = set(self.base.keys())
        parts = module.split(".")
        for i in range(len(parts)):
            candidate = ".".join(parts[i:] + [suffix])
            if candidate in keys:
                return candidate
        matches = [k for k in keys if k.endswith("." + ".".join(parts + [suffix]))]
        if len(matches) == 1:
            return matches[0]
        raise CheckpointError(self.adapter.uri, f"no tensor of the base {self.base.label} matches this adapter "
                              f"tensor (looked for {module}.{suffix}" +
                              (f"; several match: {sorted(matches)[:3]}" if matches else "") + ")", tensor=adapter_key)

    def _index(self) -> None:
        cfg = self.config
        if cfg.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(self.uri, f"adapter type {cfg.get('peft_type')!r}: only LoRA adapters are experts")
        if cfg.get("use_dora"):
            raise CheckpointError(self.uri, "DoRA adapters (use_dora) are not supported: their weight is not "
                                  "W0 + scale * B @ A")
        pairs: dict[str, dict[str, str]] = {}
        for key in self.adapter.keys():
            name = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
            if "lora_magnitude_vector" in name:
                raise CheckpointError(self.adapter.uri, "DoRA magnitude vectors are not supported", tensor=key)
            match = _LORA.match(name)
            if match:
                pairs.setdefault(match["module"], {})[match["part"].replace("embedding_", "")] = key
            else:  # saved whole: modules_to_save, biases
                module, _, suffix = name.rpartition(".")
                self.whole[self._base_key(module, suffix, key)] = key
        fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
        for module, found in pairs.items():
            if set(found) != {"lora_A", "lora_B"}:
                raise CheckpointError(self.adapter.uri, f"module {module}: lora_A and lora_B must both be saved",
                                      tensor=next(iter(found.values())))
            a_key, b_key = found["lora_A"], found["lora_B"]
            embedding = "lora_embedding_A" in a_key
            target = self._base_key(module, "weight", a_key)
            a, b = self.adapter.info(a_key).shape, self.adapter.info(b_key).shape
            rank = a[0]
            shape = self.base.info(target).shape
            delta_shape = (b[0], a[1]) if not embedding else (a[1], b[0])
            if fan_in_fan_out and not embedding:
                delta_shape = delta_shape[::-1]
            if len(a) != 2 or len(b) != 2 or b[1] != rank or tuple(shape) != tuple(delta_shape):
                raise CheckpointError(self.adapter.uri, f"module {module}: B {tuple(b)} @ A {tuple(a)} does not "
                                      f"give the base's {target} {tuple(shape)}", tensor=a_key)
            alpha = _pattern_value(module, cfg.get("alpha_pattern") or {}, cfg.get("lora_alpha", 8))
            scale = alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)
            self.lora[target] = (a_key, b_key, float(scale), embedding)
        if not self.lora and not self.whole:
            raise CheckpointError(self.adapter.uri, "the adapter holds no LoRA tensors")
        self.fan_in_fan_out = fan_in_fan_out

    def keys(self) -> list[str]:
        return self.base.keys()

    def info(self, name: str) -> TensorInfo:
        return self.base.info(name)

    def delta(self, name: str, device: torch.device | str = "cpu",
              rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        """scale * B @ A of a target module (fp32, on `device`; only `rows` [start, stop) when given), None for
        other tensors."""
        if name not in self.lora:
            return None
        a_key, b_key, scale, embedding = self.lora[name]
        a = self.adapter.get(a_key).to(device, torch.float32)
        b = self.adapter.get(b_key).to(device, torch.float32)
        part = slice(*rows) if rows is not None else slice(None)
        if embedding or self.fan_in_fan_out:  # the weight is (B @ A)^T: its rows are columns of A
            product = (b @ a[:, part]).T
        else:
            product = b[part] @ a
        return (product * scale).contiguous()

    def task_vector(self, name: str, base: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The expert's task vector of one tensor (of its `rows` [start, stop) when given; `base`: W0, or those
        rows of it, in fp32), exact for LoRA targets."""
        delta = self.delta(name, base.device, rows)
        if delta is not None:
            return delta
        if name in self.whole:
            whole = self.adapter.get(self.whole[name])
            return (whole if rows is None else whole[rows[0]:rows[1]]).to(base.device, torch.float32) - base
        return torch.zeros_like(base)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.get(name)[start:stop]

    def get(self, name: str) -> torch.Tensor:
        info = self.base.info(name)
        if name in self.whole:
            return self.adapter.get(self.whole[name]).to(info.dtype)
        delta = self.delta(name)
        base = self.base.get(name)
        if delta is None:
            return base
        return (base.to(torch.float32) + delta).to(info.dtype)

    def close(self) -> None:
        self.adapter.close()

    def __enter__(self) -> LoraExpert:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_config(uri: str, storage_options: Mapping[str, Any] | None, cache: Any) -> tuple[dict[str, Any], str]:
    """(adapter_config.json of the adapter directory `uri`, its sha256); CheckpointError naming the file."""
    try:
        config_obj = cache.fetch(join(uri, ADAPTER_CONFIG), storage_options)
        config = json.loads(config_obj.path.read_text())
    except FileNotFoundError:
        raise CheckpointError(join(uri, ADAPTER_CONFIG), "not found") from None
    except ValueError as exc:
        raise CheckpointError(join(uri, ADAPTER_CONFIG), f"invalid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointError(join(uri, ADAPTER_CONFIG), "expected a JSON object")
    return config, config_obj.sha256


def adapter_digest(uri: str, *, storage_options: Mapping[str, Any] | None = None, cache: Any = None) -> str:
    """`LoraExpert.digest` of the adapter directory `uri` without its base: both files fetched (through the cache),
    the config parsed and the weights' safetensors format checked; CheckpointError naming the file at fault."""
    from mergeflow.content_cache import ContentCache

    cache = cache or ContentCache()
    _, config_sha256 = _read_config(uri, storage_options, cache)
    with open_checkpoint(join(uri, ADAPTER_WEIGHTS), storage_options=storage_options, cache=cache) as weights:
        files = {ADAPTER_CONFIG: config_sha256, **{name: obj.sha256 for name, obj in weights.files.items()}}
    return hashlib.sha256("".join(f"{name} {sha}\n" for name, sha in sorted(files.items())).encode()).hexdigest()


def open_adapter(uri: str, base: TensorSource, *, storage_options: Mapping[str, Any] | None = None,
                 cache: Any = None) -> LoraExpert:
    """Open the PEFT LoRA adapter directory `uri` over `base`; CheckpointError naming the file (and tensor) at
    fault: a missing or unreadable config, an adapter tensor that matches no base tensor or the wrong shape."""
    from mergeflow.content_cache import ContentCache

    cache = cache or ContentCache()
    config, config_sha256 = _read_config(uri, storage_options, cache)
    adapter = open_checkpoint(join(uri, ADAPTER_WEIGHTS), storage_options=storage_options, cache=cache)
    try:
        return LoraExpert(uri, base, config, adapter, config_sha256)
    except BaseException:
        adapter.close()
        raise


def open_expert(uri: str, base: TensorSource, *, storage_options: Mapping[str, Any] | None = None,
                cache: Any = None) -> Checkpoint | LoraExpert:
    """An expert checkpoint, or a LoRA adapter directory read over `base`."""
    if is_adapter(uri, storage_options):
        return open_adapter(uri, base, storage_options=storage_options, cache=cache)
    return open_checkpoint(uri, storage_options=storage_options, cache=cache)
