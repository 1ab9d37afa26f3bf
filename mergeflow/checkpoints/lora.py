"""A linear merge of PEFT LoRA adapters written as one adapter (`mergeflow merge --as-adapter`). The adapters
themselves are read by `mergeflow.checkpoints.adapter`, which the expert pool reads below the methods; its names
stay importable from here."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from mergeflow.checkpoints.adapter import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, _PEFT_PREFIX, LoraExpert, is_adapter,
                                           open_adapter, open_expert)
from mergeflow.checkpoints.reader import open_checkpoint

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "LoraExpert", "is_adapter", "linear_weights", "merge_adapters",
           "open_adapter", "open_expert"]


def linear_weights(method: str, params: Mapping[str, Any], experts: int) -> list[float]:
    """Each expert's weight in a merge that is linear in the task vectors (the only ones an adapter can hold
    exactly): Task Arithmetic (lambda each) and averaging (1/N each)."""
    from mergeflow.errors import ConfigError
    from mergeflow.methods import build_method

    chosen = build_method(method, params)
    if method == "task_arithmetic":
        return [float(chosen.params.scaling)] * experts
    if method == "average":
        return [1.0 / experts] * experts
    raise ConfigError(f"--as-adapter: {method!r} is not linear in the task vectors; an adapter holds the merge "
                      "exactly only for task_arithmetic and average")


def merge_adapters(method: str, params: Mapping[str, Any], base: str, experts: list[str], out: str, *,
                   storage_options: Mapping[str, Any] | None = None, cache: Any = None,
                   overwrite: bool = False) -> dict[str, Any]:
    """A linear merge of LoRA adapters written as one adapter, exactly: sum_i w_i s_i B_i A_i = [w_1 s_1 B_1 | ...]
    [A_1; ...], rank the sum of the ranks that target each module (lora_alpha = r per module: scale 1); tensors the
    adapters save whole are merged as theta_0 + sum_i w_i (W_i - theta_0). Returns the record written beside it."""
    import shutil

    from safetensors.torch import save_file

    from mergeflow.content_cache import ContentCache
    from mergeflow.errors import ConfigError
    from mergeflow.storage import exists, publish_directory, staging_dir

    cache = cache or ContentCache()
    weights = linear_weights(method, params, len(experts))
    if not overwrite and exists(out, storage_options):
        raise FileExistsError(f"{out} already exists (pass overwrite to replace it)")
    base_ckpt = open_checkpoint(base, storage_options=storage_options, cache=cache)
    adapters: list[LoraExpert] = []
    try:
        for uri in experts:
            if not is_adapter(uri, storage_options):
                raise ConfigError(f"--as-adapter: {uri} is not a LoRA adapter directory (every expert must be one)")
            adapters.append(open_adapter(uri, base_ckpt, storage_options=storage_options, cache=cache))
        if len({a.fan_in_fan_out for a in adapters}) > 1:
            raise ConfigError("--as-adapter: the adapters disagree on fan_in_fan_out")
        tensors: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        modules: list[str] = []
        for target in sorted({t for a in adapters for t in a.lora}):
            a_parts, b_parts = [], []
            for w, adapter in zip(weights, adapters):
                if target in adapter.lora:
                    a_key, b_key, scale, embedding = adapter.lora[target]
                    a_parts.append(adapter.adapter.get(a_key).to(torch.float32))
                    b_parts.append(adapter.adapter.get(b_key).to(torch.float32) * (w * scale))
            module = target[: -len(".weight")]
            infix = "lora_embedding_" if embedding else "lora_"
            suffix = "" if embedding else ".weight"
            tensors[f"{_PEFT_PREFIX}{module}.{infix}A{suffix}"] = torch.cat(a_parts, dim=0).contiguous()
            tensors[f"{_PEFT_PREFIX}{module}.{infix}B{suffix}"] = torch.cat(b_parts, dim=1).contiguous()
            ranks[module], modules = sum(a.shape[0] for a in a_parts), [*modules, module]
        for target in sorted({t for a in adapters for t in a.whole}):
            theta0 = base_ckpt.get(target).to(torch.float32)
            merged = theta0 + sum(w * a.task_vector(target, theta0) for w, a in zip(weights, adapters))
            tensors[f"{_PEFT_PREFIX}{target}"] = merged.to(base_ckpt.info(target).dtype).contiguous()
        first = adapters[0].config
        rank = max(ranks.values(), default=first.get("r", 8))
        config = {**first, "r": rank, "lora_alpha": rank, "use_rslora": False, "use_dora": False,
                  "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}) or first.get("target_modules"),
                  "rank_pattern": {m: r for m, r in ranks.items() if r != rank},
                  "alpha_pattern": {m: r for m, r in ranks.items() if r != rank}}
        record = {"method": method, "params": dict(params), "weights": weights, "base": base, "experts": experts,
                  "expert_sha256": [a.digest for a in adapters], "ranks": ranks}
        staged = staging_dir(out, cache)
        try:
            save_file(tensors, str(staged / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            (staged / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
            (staged / "mergeflow.json").write_text(json.dumps(record, indent=2))
            publish_directory(staged, out, storage_options, overwrite=overwrite, last=("mergeflow.json",))
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        return record
    finally:
        for adapter in adapters:
            adapter.close()
        base_ckpt.close()
