"""CLIP vision towers (open_clip and Hugging Face) as one `ImageEncoder` whose backbone state dict matches the
expert checkpoints, with CLIP's preprocessing (evaluation, statistics and AdaMerging's objective: `evaluation`).

Checkpoint names are the backbone's own:
- open_clip: the visual tower's, as `model.visual.state_dict()` (`conv1.weight`, `proj`,
  `transformer.resblocks.0.attn.in_proj_weight`, ...); `open_clip_visual_state_dict` cuts them out of a full model;
- Hugging Face: `CLIPVisionModelWithProjection`'s (`vision_model.…` and `visual_projection.weight`), which are
  also the vision keys of a full `CLIPModel`; without a projection only `vision_model.…`, as transformers 4 saved
  a `CLIPVisionModel`. The `vision_model.embeddings.position_ids` buffer some older files hold is ignored.

Features are the projected image embeddings (open_clip `encode_image`, Hugging Face `image_embeds`), L2-normalised
unless `normalize=False`: heads (`mergeflow.heads`) act on unit-norm features, so a CLIP zero-shot head is a plain
`ClassificationHead` (`mergeflow.families.clip.zeroshot`).

open_clip's "openai" weights were trained with QuickGELU: build them from a `-quickgelu` config or with
`quick_gelu=True` (the plain config names use nn.GELU, and features then differ silently).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from mergeflow.checkpoints.safetensors_format import save_safetensors
from mergeflow.checkpoints import open_checkpoint
from mergeflow.errors import CheckpointError, ConfigError, InputError
from mergeflow.storage import sha256_file
from mergeflow.content_cache import ContentCache

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_IGNORED_KEYS = ("vision_model.embeddings.position_ids",)  # a buffer transformers 5 no longer saves

ImageInput = Union[Image.Image, np.ndarray, Tensor]  # PIL, or uint8 [H, W] / [H, W, C] arrays
Weights = Union[Mapping[str, Tensor], str, Path]  # a state dict, or a checkpoint path/URI (any layout)


# ---------------------------------------------------------------------------------------------- preprocessing


def _to_pil(image: ImageInput, index: int) -> Image.Image:
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    array = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if array.dtype != np.uint8:
        raise InputError(f"image {index}: arrays must be uint8 (0-255), got {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise InputError(f"image {index}: expected an [H, W] or [H, W, 3|4] array, got shape {array.shape}")
    return Image.fromarray(array).convert("RGB")


def _resize_crop(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` (bicubic), long side scaled and truncated, then the centred `size` square."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    image = image.resize(new_size, Image.Resampling.BICUBIC)
    left, top = int(round((new_size[0] - size) / 2.0)), int(round((new_size[1] - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def clip_preprocess(images: Sequence[ImageInput] | np.ndarray, image_size: int, *,
                    mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> Tensor:
    """CLIP's evaluation transform: [B, 3, S, S] float32 from PIL images or uint8 arrays (a sequence, or one array
    whose first axis is the batch). Each image becomes RGB, its shorter side is resized to S (bicubic, antialiased),
    the centre S x S is cropped, scaled to [0, 1] and normalised per channel with `mean` and `std`."""
    if isinstance(images, np.ndarray) and images.ndim not in (3, 4):
        raise InputError(f"a batch array must be [N, H, W] or [N, H, W, C], got shape {images.shape}")
    if image_size < 1:
        raise ConfigError(f"image_size must be positive, got {image_size}")
    arrays = [np.asarray(_resize_crop(_to_pil(image, i), image_size), dtype=np.float32)
              for i, image in enumerate(images)]
    if not arrays:
        return torch.empty(0, 3, image_size, image_size)
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((pixels - mean_t) / std_t).contiguous()


# ---------------------------------------------------------------------------------------------- the encoder


class HFVisionTower(nn.Module):
    """A Hugging Face `CLIPVisionModel` plus, when present, its `visual_projection`: pixels -> [B, D] embeddings
    (the pooled, post-LayerNorm class token, projected). Parameter names are those of
    `CLIPVisionModelWithProjection`."""

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Linear | None) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection

    def forward(self, pixel_values: Tensor) -> Tensor:
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        return pooled if self.visual_projection is None else self.visual_projection(pooled)


class ImageEncoder(nn.Module):
    """A CLIP vision tower: [B, 3, S, S] preprocessed pixels -> [B, D] projected image embeddings (unit-norm when
    `normalize`). `backbone` holds exactly the checkpoint's parameters, under the checkpoint's names; a
    `frozen_projection` (the pretrained `visual_projection` of checkpoints that hold only `vision_model.*`, as
    FusionBench's CLIPVisionModel experts) follows it, never trained nor merged."""

    def __init__(self, backbone: nn.Module, *, image_size: int, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD, normalize: bool = True,
                 frozen_projection: nn.Linear | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.normalize = normalize
        self.frozen_projection = frozen_projection.requires_grad_(False) if frozen_projection is not None else None

    def forward(self, pixel_values: Tensor) -> Tensor:
        features = self.backbone(pixel_values)
        if self.frozen_projection is not None:
            features = self.frozen_projection(features)
        return F.normalize(features, dim=-1) if self.normalize else features

    def preprocess(self, images: Sequence[ImageInput] | np.ndarray) -> Tensor:
        """`clip_preprocess` with this model's image size, mean and std."""
        return clip_preprocess(images, self.image_size, mean=self.mean, std=self.std)


def _read_weights(weights: Weights, storage_options: Mapping[str, Any] | None = None,
                  cache: ContentCache | None = None) -> tuple[dict[str, Tensor], str]:
    if isinstance(weights, Mapping):
        return dict(weights), "<state dict>"
    with open_checkpoint(str(weights), storage_options=storage_options, cache=cache) as checkpoint:
        return {key: checkpoint.get(key) for key in checkpoint.keys()}, str(weights)


def _hint(own: Mapping[str, Tensor], unexpected: list[str]) -> str:
    if any(k.startswith("visual.") for k in unexpected) and not any(k.startswith("visual.") for k in own):
        return " (a full open_clip state dict? cut the tower out with open_clip_visual_state_dict)"
    if any(k.startswith(("text_model.", "text_projection.")) for k in unexpected):
        return " (a full CLIPModel state dict? cut the tower out with hf_vision_state_dict)"
    if unexpected and all(f"vision_model.{k}" in own for k in unexpected):
        return " (keys without the 'vision_model.' prefix, as a transformers 5 CLIPVisionModel saves them: add it)"
    return ""


def _load_strict(backbone: nn.Module, state: dict[str, Tensor], label: str) -> None:
    """Load `state` (read from `label`) into `backbone`: every key present, none extra, every shape equal
    (CheckpointError names the file and the keys at fault)."""
    for key in _IGNORED_KEYS:
        state.pop(key, None)
    own = backbone.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        def listed(keys: list[str]) -> str:
            return f"{keys[:8]}{' ...' if len(keys) > 8 else ''} ({len(keys)})"

        raise CheckpointError(label, f"state dict does not fit the vision tower: missing keys {listed(missing)}, "
                                     f"unexpected keys {listed(unexpected)}{_hint(own, unexpected)}",
                              tensor=(missing or unexpected)[0])
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise CheckpointError(label, f"shape {tuple(tensor.shape)}, but the vision tower has "
                                         f"{tuple(own[key].shape)}", tensor=key)
    backbone.load_state_dict(state, strict=True)


def open_clip_image_encoder(model_name: str, weights: Weights | None = None, *,
                            config_dir: str | Path | None = None, quick_gelu: bool | None = None,
                            normalize: bool = True, storage_options: Mapping[str, Any] | None = None,
                            cache: ContentCache | None = None) -> ImageEncoder:
    """The visual tower of open_clip config `model_name` (built alone, no text tower), with `weights` (its visual
    state dict, or a checkpoint URI holding one, read with `open_checkpoint`) or random initialisation.
    `config_dir` first registers the JSON configs in that folder (`open_clip.add_model_config`); `quick_gelu`
    overrides the config's activation. Eval mode."""
    import open_clip

    if config_dir is not None:
        if not Path(config_dir).exists():
            raise ConfigError(f"config_dir {config_dir} does not exist")
        open_clip.add_model_config(Path(config_dir))
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ConfigError(f"unknown open_clip model config {model_name!r}: pass config_dir= with its JSON file, or "
                          "pick one of open_clip.list_models()")
    return open_clip_config_image_encoder(config, weights, label=f"open_clip config {model_name!r}",
                                          quick_gelu=quick_gelu, normalize=normalize,
                                          storage_options=storage_options, cache=cache)


def open_clip_config_image_encoder(config: Mapping[str, Any], weights: Weights | None = None, *,
                                   label: str = "open_clip config", quick_gelu: bool | None = None,
                                   normalize: bool = True, storage_options: Mapping[str, Any] | None = None,
                                   cache: ContentCache | None = None) -> ImageEncoder:
    """`open_clip_image_encoder` from an open_clip model config dict (`embed_dim`, `vision_cfg`, optional
    `quick_gelu` and `preprocess_cfg`) instead of a registered name; `label` names the config in errors."""
    from open_clip.model import _build_vision_tower

    if "vision_cfg" not in config or "embed_dim" not in config:
        raise ConfigError(f"{label} has no vision_cfg/embed_dim")
    visual = _build_vision_tower(config["embed_dim"], config["vision_cfg"],
                                 config.get("quick_gelu", False) if quick_gelu is None else quick_gelu)
    if weights is not None:
        _load_strict(visual, *_read_weights(weights, storage_options, cache))
    size = visual.image_size if hasattr(visual, "image_size") else config["vision_cfg"].get("image_size", 224)
    sizes = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    if sizes[0] != sizes[1]:
        raise ConfigError(f"{label}: non-square image size {sizes} is not supported")
    preprocess = config.get("preprocess_cfg") or {}
    return ImageEncoder(visual, image_size=sizes[0], mean=preprocess.get("mean", CLIP_MEAN),
                        std=preprocess.get("std", CLIP_STD), normalize=normalize).eval()


def hf_clip_image_encoder(config: str | Path | object, weights: Weights | None = None, *,
                          projection: bool | None = None, normalize: bool = True,
                          storage_options: Mapping[str, Any] | None = None,
                          cache: ContentCache | None = None) -> ImageEncoder:
    """A Hugging Face CLIP vision tower from a local model folder (its `config.json`, and `preprocessor_config.json`
    for image size, mean and std when present) or a config object: a `CLIPConfig` (its vision part and
    `projection_dim`) or a `CLIPVisionConfig`. `projection` (default: a CLIPConfig, an architecture named
    `...WithProjection`, or weights holding `visual_projection.weight`) adds `visual_projection`. `weights` as for
    `open_clip_image_encoder`. Eval mode."""
    from transformers import AutoConfig, CLIPConfig, CLIPVisionConfig, CLIPVisionModel

    preprocess: dict = {}
    if isinstance(config, (str, Path)):
        folder = Path(config)
        if not (folder / "config.json").is_file():
            raise ConfigError(f"{folder}: no config.json (only local model folders are read)")
        processor_file = folder / "preprocessor_config.json"
        if processor_file.is_file():
            preprocess = json.loads(processor_file.read_text())
        config = AutoConfig.from_pretrained(folder)
    state, label = _read_weights(weights, storage_options, cache) if weights is not None else (None, "")
    if isinstance(config, CLIPConfig):
        vision_config = CLIPVisionConfig.from_dict({**config.vision_config.to_dict(),
                                                    "projection_dim": config.projection_dim})
        default_projection = True
    elif isinstance(config, CLIPVisionConfig):
        vision_config = config
        architectures = getattr(config, "architectures", None) or []
        default_projection = any("WithProjection" in a for a in architectures) or (
            state is not None and "visual_projection.weight" in state)
    else:
        raise ConfigError(f"not a CLIP config: {type(config).__name__} "
                          f"(model_type {getattr(config, 'model_type', None)!r}); expected clip or clip_vision_model")
    with_projection = default_projection if projection is None else projection
    tower = HFVisionTower(
        CLIPVisionModel(vision_config),
        nn.Linear(vision_config.hidden_size, vision_config.projection_dim, bias=False) if with_projection else None,
    )
    if state is not None:
        _load_strict(tower, state, label)
    size = preprocess.get("crop_size", vision_config.image_size)
    size = size.get("height", vision_config.image_size) if isinstance(size, dict) else size
    return ImageEncoder(tower, image_size=int(size), mean=preprocess.get("image_mean", CLIP_MEAN),
                        std=preprocess.get("image_std", CLIP_STD), normalize=normalize).eval()


# ---------------------------------------------------------------------------------------------- state dicts


def _copies(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {key: state[key].detach().to("cpu", copy=True).contiguous() for key in sorted(state)}


def open_clip_visual_state_dict(source: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The visual tower's state dict (names as `model.visual.state_dict()`, CPU copies) of a full open_clip model,
    or of a full open_clip state dict (its `visual.` keys, prefix removed)."""
    if isinstance(source, nn.Module):
        visual = getattr(source, "visual", None)
        if not isinstance(visual, nn.Module):
            raise InputError(f"{type(source).__name__} has no `visual` tower: not an open_clip model")
        return _copies(visual.state_dict())
    state = {key[len("visual."):]: tensor for key, tensor in source.items() if key.startswith("visual.")}
    if not state:
        raise CheckpointError("<state dict>", "no 'visual.' keys: not a full open_clip state dict")
    return _copies(state)


def hf_vision_state_dict(source: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The vision keys (`vision_model.…`, `visual_projection.weight`) of a Hugging Face `CLIPModel` or
    `CLIPVisionModelWithProjection`, or of their state dicts, as CPU copies."""
    state = source.state_dict() if isinstance(source, nn.Module) else source
    kept = {key: tensor for key, tensor in state.items()
            if key.startswith(("vision_model.", "visual_projection.")) and key not in _IGNORED_KEYS}
    if not kept:
        raise CheckpointError("<state dict>", "no 'vision_model.' keys: not a Hugging Face CLIP state dict")
    return _copies(kept)


def image_encoder_state_dict(encoder: ImageEncoder) -> dict[str, Tensor]:
    """The backbone's weights as CPU, contiguous copies, under the checkpoint names, in name order."""
    return _copies(encoder.backbone.state_dict())


def save_state_dict(state: Mapping[str, Tensor], path: str | Path) -> str:
    """Write `state` as one safetensors file at local `path` (atomically); returns its sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    save_safetensors(_copies(state), partial)
    os.replace(partial, path)
    return sha256_file(path)


def save_open_clip_visual(source: nn.Module | Mapping[str, Tensor], path: str | Path) -> str:
    """`open_clip_visual_state_dict(source)` saved as safetensors at `path`; returns its sha256."""
    return save_state_dict(open_clip_visual_state_dict(source), path)
