"""CLIP zero-shot classification heads from class names and prompt templates.

Per class, every template is filled with the class name and embedded by the CLIP text tower; the embeddings are
L2-normalised, averaged over the templates and normalised again. The head's weight rows are these class
embeddings, its bias is zero and its `logit_scale` is CLIP's exp(logit_scale), so on unit-norm image features
(`ImageEncoder(normalize=True)`, the default) `ClassificationHead.logits` is exactly CLIP's zero-shot logits
`scale * normalize(image) @ classes.T`. The heads are plain `mergeflow.heads.ClassificationHead`s and are saved and
loaded as such (safetensors `weight`, `bias`, metadata `logit_scale`); `zeroshot_logits` normalises raw features.
Templates hold one `{}` for the class name (`mergeflow.families.clip.templates`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergeflow.errors import ConfigError
from mergeflow.families.base import device_of
from mergeflow.heads import ClassificationHead

TextEmbedder = Callable[[Sequence[str]], Tensor]  # texts -> [N, D] embeddings (not necessarily normalised)


def open_clip_text_embedder(model: nn.Module, tokenizer: Callable[[Sequence[str]], Tensor], *,
                            batch_size: int = 256) -> TextEmbedder:
    """Texts -> `model.encode_text` embeddings (float32, CPU), tokenised with an open_clip tokenizer
    (`open_clip.get_tokenizer(name)`), on the model's device in eval mode."""

    @torch.no_grad()
    def embed(texts: Sequence[str]) -> Tensor:
        model.eval()
        device = device_of(model)
        chunks = [model.encode_text(tokenizer(list(texts[i:i + batch_size])).to(device)).float().cpu()
                  for i in range(0, len(texts), batch_size)]
        return torch.cat(chunks)

    return embed


def hf_clip_text_embedder(model: nn.Module, tokenizer: Callable[..., Any], *, batch_size: int = 256,
                          max_length: int | None = None) -> TextEmbedder:
    """Texts -> `CLIPModel.get_text_features` embeddings (float32, CPU) with a Hugging Face tokenizer (padded,
    truncated to `max_length` or the model's maximum), on the model's device in eval mode."""
    limit = max_length or model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def embed(texts: Sequence[str]) -> Tensor:
        model.eval()
        device = device_of(model)
        chunks = []
        for i in range(0, len(texts), batch_size):
            inputs = tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True, max_length=limit,
                               return_tensors="pt")
            output = model.get_text_features(input_ids=inputs["input_ids"].to(device),
                                             attention_mask=inputs["attention_mask"].to(device))
            # transformers 5 returns a model output whose pooler_output is projected; 4.x returned the tensor
            chunks.append((output if isinstance(output, Tensor) else output.pooler_output).float().cpu())
        return torch.cat(chunks)

    return embed


def class_embeddings(embed: TextEmbedder, class_names: Sequence[str], templates: Sequence[str]) -> Tensor:
    """[C, D] unit rows: per class, the renormalised mean of its normalised template embeddings."""
    if not class_names or not templates:
        raise ConfigError("a zero-shot head needs at least one class name and one template")
    for template in templates:
        if template.count("{}") != 1:
            raise ConfigError(f"template {template!r} must hold exactly one '{{}}' for the class name")
    texts = [template.format(name) for name in class_names for template in templates]
    embeddings = F.normalize(embed(texts).float(), dim=-1).reshape(len(class_names), len(templates), -1)
    return F.normalize(embeddings.mean(dim=1), dim=-1)


def zeroshot_head(embed: TextEmbedder, class_names: Sequence[str], templates: Sequence[str], *,
                  logit_scale: float) -> ClassificationHead:
    """The zero-shot head of `class_names` (weight [C, D] class embeddings, zero bias, `logit_scale` = CLIP's
    exp(logit_scale), e.g. 100 for the trained OpenAI models)."""
    weight = class_embeddings(embed, class_names, templates)
    return ClassificationHead(weight, torch.zeros(weight.shape[0]), float(logit_scale))


def open_clip_zeroshot_head(model: nn.Module, tokenizer: Callable[[Sequence[str]], Tensor],
                            class_names: Sequence[str], templates: Sequence[str]) -> ClassificationHead:
    """`zeroshot_head` with an open_clip model's text tower and its own exp(logit_scale)."""
    scale = float(model.logit_scale.detach().exp().reshape(-1)[0])
    return zeroshot_head(open_clip_text_embedder(model, tokenizer), class_names, templates, logit_scale=scale)


def hf_zeroshot_head(model: nn.Module, tokenizer: Callable[..., Any], class_names: Sequence[str],
                     templates: Sequence[str]) -> ClassificationHead:
    """`zeroshot_head` with a Hugging Face `CLIPModel`'s text tower and its own exp(logit_scale)."""
    scale = float(model.logit_scale.detach().exp().reshape(-1)[0])
    return zeroshot_head(hf_clip_text_embedder(model, tokenizer), class_names, templates, logit_scale=scale)


def zeroshot_logits(head: ClassificationHead, image_features: Tensor) -> Tensor:
    """[B, C] logits of raw (unnormalised) image features: normalised first, as CLIP does."""
    return head.logits(F.normalize(image_features, dim=-1))
