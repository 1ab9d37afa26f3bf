"""LoRA fine-tuning of causal LMs (peft): the expert is a PEFT adapter directory, not a model.

`finetune_causal_lm_lora` injects LoRA layers into the target modules (`peft.get_peft_model`, initialised from the
run's seed: A Kaiming-uniform, B zero), trains only them on the same targets and loss as full fine-tuning
(`training.finetune_causal_lm`: one request per example, cross-entropy over the target tokens) through the generic
trainer, so the schedule, the checkpoints (the adapters' tensors and their optimizer state only: a few MB, never the
model) and the bit-identical resume are the same; then removes the layers, leaving the model as it came. The base
weights stay in their dtype and frozen; the adapters train in fp32 (peft keeps them so over a bf16 model).

Returned: the adapter's tensors under PEFT's names (`base_model.model.<module>.lora_A.weight`, fp32) and its
`adapter_config.json` (peft's own LoraConfig: target modules sorted, no base path), which `PeftModel.from_pretrained`
loads and `mergeflow.checkpoints.adapter` reads as an expert (W0 + lora_alpha / r * B @ A per target).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mergeflow.errors import ConfigError, InputError
from mergeflow.families.causal_lm.data import CausalSplit
from mergeflow.families.causal_lm.scoring import TaskPrompt, pad_id_of
from mergeflow.families.causal_lm.training import (_digest, _TokenLogits, target_labels, token_logits,
                                                   training_requests)
from mergeflow.finetune import FinetuneResult, FinetuneSettings, TrainingData, train_classifier


def lora_config(lora: Mapping[str, Any]) -> Any:
    """peft's LoraConfig of the run's `finetune.lora` settings (r, alpha, dropout, target_modules)."""
    import peft

    targets = lora.get("target_modules")
    return peft.LoraConfig(r=int(lora["r"]), lora_alpha=int(lora["alpha"]), lora_dropout=float(lora["dropout"]),
                           target_modules=sorted(targets) if targets else None, task_type="CAUSAL_LM")


def adapter_config(peft_config: Any) -> dict[str, Any]:
    """The adapter_config.json of `peft_config` as peft writes it (sets as sorted lists), without the base's path."""
    data = peft_config.to_dict()
    data["base_model_name_or_path"] = None
    return json.loads(json.dumps(data, sort_keys=True,
                                 default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))


def adapter_tensors(peft_model: Any) -> dict[str, Tensor]:
    """The adapter's trained tensors under PEFT's saved names, CPU copies, keys sorted."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model, save_embedding_layers=False)  # never the base's own layers
    return {name: state[name].detach().to("cpu", copy=True).contiguous() for name in sorted(state)}


class _Adapters(nn.Module):
    """The adapters' parameters as one module: what the trainer optimises, checkpoints and restores (the frozen
    model is neither in its optimizer nor in its checkpoints)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.weights = nn.ParameterList([p for p in model.parameters() if p.requires_grad])


def finetune_causal_lm_lora(model: nn.Module, tokenizer: Any, prompt: TaskPrompt, split: CausalSplit,
                            settings: FinetuneSettings, lora: Mapping[str, Any], *,
                            device: str | torch.device = "cpu", progress: bool = True,
                            checkpoint_dir: str | None = None, storage_options: Mapping[str, Any] | None = None
                            ) -> tuple[FinetuneResult, dict[str, Any]]:
    """Train a LoRA adapter of `model` on the split's targets (`settings.max_length` tokens per example); returns
    the result (its state dict: the adapter's tensors) and the adapter's config. `model` is left as it came."""
    import peft

    requests = training_requests(tokenizer, prompt, split, settings.max_length)
    if not requests:
        raise InputError("cannot fine-tune on an empty split")
    device = torch.device(device)
    model.to(device)
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    with torch.random.fork_rng(devices=[]):  # the adapters' initialisation: a function of the seed alone
        torch.manual_seed(settings.seed)
        try:
            peft_model = peft.get_peft_model(model, lora_config(lora))
        except ValueError as exc:  # e.g. no module of the model matches target_modules
            raise ConfigError(f"finetune.lora: {exc}") from None
    try:
        peft_model.train()
        labels, pad = target_labels(requests, settings.max_length), pad_id_of(tokenizer)

        def features(batch: Tensor) -> Tensor:  # the model itself now runs through its LoRA layers
            return token_logits(model, [requests[int(i)] for i in batch], settings.max_length, pad,
                                width=settings.max_length)[0]

        # a checkpoint resumes only on the same data and the same LoRA settings
        digest = hashlib.sha256(f"{_digest(prompt, split)} {json.dumps(dict(lora), sort_keys=True)}".encode())
        data = TrainingData(len(requests), labels, features, digest.hexdigest())
        result = train_classifier(_Adapters(peft_model), _TokenLogits(), data, settings,  # type: ignore[arg-type]
                                  lambda: adapter_tensors(peft_model), device=device, progress=progress,
                                  checkpoint_dir=checkpoint_dir, storage_options=storage_options)
        config = adapter_config(peft_model.peft_config["default"])
    finally:
        peft_model.unload()  # the LoRA layers out again (not merged): the model as it came
        for name, p in model.named_parameters():
            p.requires_grad_(trainable.get(name, p.requires_grad))
        model.eval()
    return result, config
