"""CLIP model directories: how the pipeline stores a pretrained CLIP model (open_clip or Hugging Face).

`model.safetensors` holds exactly the vision tower's tensors under the expert checkpoints' names (theta_0, what
is fine-tuned and merged); the optional `text.safetensors` holds every other tensor of the full model (text tower,
its projection, logit_scale), which only zero-shot heads need. Two layouts:

- open_clip: `open_clip_config.json`, the open_clip model config (`embed_dim`, `vision_cfg`, `text_cfg`, optional
  `quick_gelu`, `custom_text`, `preprocess_cfg`; a Hub-style `{"model_cfg": ..., "preprocess_cfg": ...}` file is
  read too); `model.safetensors` with `model.visual` names (`conv1.weight`, `proj`, ...); `text.safetensors` with
  the full model's other names (`token_embedding.weight`, `transformer.*`, `ln_final.*`, `text_projection`,
  `logit_scale`). The tokenizer is open_clip's own `SimpleTokenizer` for `text_cfg`'s context length, built
  from the config alone (nothing is registered with open_clip).
- hf_clip: `config.json` of a `CLIPConfig`, `preprocessor_config.json` (image size, mean, std), the tokenizer
  files; `model.safetensors` with `vision_model.*` and `visual_projection.weight`; `text.safetensors` with
  `text_model.*`, `text_projection.weight` and `logit_scale`. Experts that hold only `vision_model.*`
  (FusionBench's CLIPVisionModel checkpoints) go with a `model.safetensors` of only `vision_model.*` and the
  pretrained `visual_projection.weight` in `text.safetensors`: the projection is then frozen, not merged.

Zero-shot heads build the full model of the config and load only `text.safetensors` into it: the vision tower
plays no part in a head, so its weights are not read.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mergeflow.families.clip.vision import (
    ImageEncoder,
    hf_clip_image_encoder,
    hf_vision_state_dict,
    open_clip_config_image_encoder,
    open_clip_visual_state_dict,
    save_state_dict,
)
from mergeflow.families.clip.zeroshot import hf_zeroshot_head, open_clip_zeroshot_head
from mergeflow.checkpoints import open_checkpoint
from mergeflow.errors import CheckpointError, ConfigError, InputError
from mergeflow.families.base import listed_keys
from mergeflow.heads import ClassificationHead

ClipKind = Literal["open_clip", "hf_clip"]
WEIGHTS_NAME = "model.safetensors"
TEXT_NAME = "text.safetensors"
CONFIG_FILES: dict[str, str] = {"open_clip": "open_clip_config.json", "hf_clip": "config.json"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
PROJECTION = "visual_projection.weight"  # hf_clip
_VISION_PREFIXES: dict[str, tuple[str, ...]] = {"open_clip": ("visual.",),
                                                "hf_clip": ("vision_model.", "visual_projection.")}


# ---------------------------------------------------------------------------------------------- the directory


def _config_file(family: str) -> str:
    if family not in CONFIG_FILES:
        raise ConfigError(f"unknown CLIP family {family!r}; expected one of {', '.join(CONFIG_FILES)}")
    return CONFIG_FILES[family]


def check_clip_model_dir(directory: Path, family: ClipKind, *, label: str) -> None:
    """ConfigError naming `label` and the missing file unless `directory` holds the family's config file and
    `model.safetensors`."""
    directory = Path(directory)
    config_file = _config_file(family)
    if not directory.is_dir():
        raise ConfigError(f"{label}: the {family} model directory {directory} does not exist")
    for name in (config_file, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise ConfigError(f"{label}: no {name} in the {family} model directory {directory}")


def has_text_tower(directory: Path) -> bool:
    """Whether `directory` holds `text.safetensors`, from which zero-shot heads are built."""
    return (Path(directory) / TEXT_NAME).is_file()


def _read_state(path: Path) -> dict[str, Tensor]:
    with open_checkpoint(str(path)) as checkpoint:
        return {key: checkpoint.get(key) for key in checkpoint.keys()}


def _check_fits(state: Mapping[str, Tensor], own: Mapping[str, Tensor], label: str, what: str) -> None:
    """CheckpointError naming `label` and the first key at fault unless `state` has exactly `own`'s keys and
    shapes."""
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(label, f"does not fit the {what}: missing keys {listed_keys(missing)}, unexpected keys "
                                     f"{listed_keys(unexpected)}", tensor=(missing or unexpected)[0])
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise CheckpointError(label, f"shape {tuple(tensor.shape)}, but the {what} has "
                                         f"{tuple(own[key].shape)}", tensor=key)


def _write_json(payload: Mapping[str, Any], path: Path) -> None:
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_text(json.dumps(payload, indent=2) + "\n")
    except TypeError as exc:
        raise ConfigError(f"{path.name}: the config is not JSON-serialisable: {exc}") from None
    os.replace(partial, path)


def _write_towers(directory: Path, vision: Mapping[str, Tensor], text: Mapping[str, Tensor] | None) -> None:
    """`text.safetensors` (or, when `text` is None, no stale one), then `model.safetensors`."""
    if text is None:
        (directory / TEXT_NAME).unlink(missing_ok=True)
    else:
        save_state_dict(text, directory / TEXT_NAME)
    save_state_dict(vision, directory / WEIGHTS_NAME)


def _text_state(state: Mapping[str, Tensor], family: str) -> dict[str, Tensor]:
    """The non-vision entries of a full model's state dict (position-id buffers left out)."""
    return {key: tensor for key, tensor in state.items()
            if not key.startswith(_VISION_PREFIXES[family]) and not key.endswith("position_ids")}


def _load_text_tower(model: nn.Module, path: Path, family: str) -> None:
    """Load `text.safetensors` at `path` into the full `model`: exactly its non-vision tensors (hf_clip: and the
    frozen `visual_projection.weight` when the file holds it), by name and shape (CheckpointError names the file
    and key); the vision tower keeps its initial weights."""
    state = {key: tensor for key, tensor in _read_state(path).items() if not key.endswith("position_ids")}
    own = _text_state(model.state_dict(), family)
    if family == "hf_clip" and PROJECTION in state:
        own[PROJECTION] = model.state_dict()[PROJECTION]
    _check_fits(state, own, str(path), "text tower")
    model.load_state_dict(state, strict=False)


def _no_text_error(directory: Path) -> ConfigError:
    return ConfigError(f"{directory}: no {TEXT_NAME}, so no zero-shot heads can be built from this model directory: "
                       f"give each task a `head`, or add {TEXT_NAME} (the text tower, as save_open_clip_model_dir / "
                       "save_hf_clip_model_dir write it)")


# ---------------------------------------------------------------------------------------------- open_clip


def _named_open_clip_config(name: Any, label: str) -> dict[str, Any]:
    """The model config open_clip ships under `name` (read from the installed package, never downloaded)."""
    import open_clip

    config = open_clip.get_model_config(name) if isinstance(name, str) else None
    if config is None:
        known = [n for n in open_clip.list_models() if n.startswith("ViT-")][:8]
        raise ConfigError(f"{label}: model_name {name!r} is not an open_clip model config (for example "
                          f"{', '.join(known)})")
    return dict(config)


def _check_open_clip_config(config: Mapping[str, Any], label: str) -> None:
    for field in ("embed_dim", "vision_cfg", "text_cfg"):
        if field not in config:
            raise ConfigError(f"{label}: no field {field!r} (an open_clip model config has embed_dim, vision_cfg, "
                              "text_cfg)")
    for field in ("vision_cfg", "text_cfg"):
        if not isinstance(config[field], Mapping):
            raise ConfigError(f"{label}: field {field!r} must be an object, not {type(config[field]).__name__}")


def read_open_clip_config(directory: Path) -> dict[str, Any]:
    """The open_clip model config of `directory/open_clip_config.json`: flat, Hub-style with `model_cfg` (whose
    top-level `preprocess_cfg` is moved into it), or `{"model_name": "ViT-B-32", ...}` naming one of the configs
    that ship with open_clip (other keys, such as `"quick_gelu": true` for OpenAI weights, override it)."""
    path = Path(directory) / CONFIG_FILES["open_clip"]
    if not path.is_file():
        raise ConfigError(f"{directory}: no {path.name} in the open_clip model directory")
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a JSON object (an open_clip model config)")
    config = dict(raw["model_cfg"]) if isinstance(raw.get("model_cfg"), dict) else raw
    if config is not raw and isinstance(raw.get("preprocess_cfg"), dict):
        config.setdefault("preprocess_cfg", raw["preprocess_cfg"])
    if "model_name" in config and "embed_dim" not in config:
        config = {**_named_open_clip_config(config["model_name"], str(path)),
                  **{key: value for key, value in config.items() if key != "model_name"}}
    _check_open_clip_config(config, str(path))
    return config


def _open_clip_model(config: Mapping[str, Any], label: str) -> nn.Module:
    """The full open_clip model of `config` (random weights), of the class `open_clip.create_model` picks: CoCa
    with `multimodal_cfg`, CustomTextCLIP with `custom_text` or a Hugging Face text model, otherwise CLIP; no
    pretrained tower weights are fetched."""
    from open_clip.coca_model import CoCa
    from open_clip.model import CLIP, CustomTextCLIP

    kwargs = copy.deepcopy(dict(config))
    kwargs.pop("preprocess_cfg", None)
    text_cfg, vision_cfg = kwargs["text_cfg"], kwargs["vision_cfg"]
    if "hf_model_name" in text_cfg:
        text_cfg["hf_model_pretrained"] = False
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False
    custom = kwargs.pop("custom_text", False) or "hf_model_name" in text_cfg
    model_class = (CoCa if "multimodal_cfg" in kwargs else CustomTextCLIP) if custom else CLIP
    try:
        return model_class(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{label}: not a valid open_clip {model_class.__name__} config: {exc}") from None


def save_open_clip_model_dir(model: nn.Module, config: Mapping[str, Any], directory: Path, *,
                             text: bool = True) -> None:
    """Write the open_clip layout of the full open_clip `model` built from `config` (its model config dict) into
    `directory`: `open_clip_config.json`, `model.safetensors` (the visual tower) and, with `text`,
    `text.safetensors` (everything else). ConfigError when the model's tensors do not match `config`."""
    directory = Path(directory)
    config = dict(config)
    _check_open_clip_config(config, "open_clip config")
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        reference = _open_clip_model(config, "open_clip config").state_dict()
    state = model.state_dict()
    try:
        _check_fits(state, reference, f"{type(model).__name__} state dict", "model of the open_clip config")
    except CheckpointError as exc:
        raise ConfigError(f"the model does not match its config: {exc}") from None
    directory.mkdir(parents=True, exist_ok=True)
    _write_json(config, directory / CONFIG_FILES["open_clip"])
    _write_towers(directory, open_clip_visual_state_dict(model), _text_state(state, "open_clip") if text else None)


def _open_clip_tokenizer(config: Mapping[str, Any], label: str) -> Any:
    """open_clip's own tokenizer for `config`, as `open_clip.get_tokenizer` builds it for a registered name."""
    from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, SimpleTokenizer

    text_cfg = config["text_cfg"]
    if text_cfg.get("hf_tokenizer_name"):
        raise ConfigError(f"{label}: text_cfg.hf_tokenizer_name ({text_cfg['hf_tokenizer_name']!r}) is not "
                          "supported for zero-shot heads (only open_clip's own tokenizer is built offline); give "
                          "each task a `head`")
    return SimpleTokenizer(context_length=text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH),
                           **text_cfg.get("tokenizer_kwargs", {}))


# ---------------------------------------------------------------------------------------------- Hugging Face


def save_hf_clip_model_dir(model: nn.Module, directory: Path, *, tokenizer: Any = None, text: bool = True,
                           merge_projection: bool = True) -> None:
    """Write the hf_clip layout of a Hugging Face `CLIPModel` into `directory`: `config.json`,
    `preprocessor_config.json` (CLIP's evaluation transform at the model's image size), the `tokenizer`'s files
    when given (zero-shot heads need them), `model.safetensors` (the vision keys) and, with `text`,
    `text.safetensors` (the other keys). `merge_projection=False` (for experts with only `vision_model.*`, as
    FusionBench's) moves `visual_projection.weight` into `text.safetensors`, where it stays frozen."""
    from transformers import CLIPConfig, CLIPImageProcessor

    if not isinstance(getattr(model, "config", None), CLIPConfig):
        raise InputError(f"{type(model).__name__} is not a Hugging Face CLIPModel (its config is not a CLIPConfig)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    size = model.config.vision_config.image_size
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    vision, rest = hf_vision_state_dict(model), _text_state(model.state_dict(), "hf_clip")
    if not merge_projection:
        if not text:
            raise InputError("merge_projection=False keeps visual_projection.weight in text.safetensors: needs text")
        rest[PROJECTION] = vision.pop(PROJECTION)
    _write_towers(directory, vision, rest if text else None)


def _hf_clip_config(directory: Path) -> Any:
    from transformers import AutoConfig, CLIPConfig

    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    if not isinstance(config, CLIPConfig):
        raise ConfigError(f"{directory / 'config.json'}: model_type {config.model_type!r}, but zero-shot heads need "
                          "a full CLIPConfig (model_type 'clip')")
    return config


def _hf_tokenizer(directory: Path) -> Any:
    from transformers import AutoTokenizer

    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"{directory}: no tokenizer files ({', '.join(TOKENIZER_FILES)}), which zero-shot heads "
                          "need: save_hf_clip_model_dir(..., tokenizer=...) writes them, or give each task a `head`")
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


# ---------------------------------------------------------------------------------------------- loading


def load_clip_image_encoder(directory: Path, family: ClipKind, weights: Mapping[str, Tensor] | None = None,
                            device: str | torch.device = "cpu") -> ImageEncoder:
    """The vision tower of the model directory as an `ImageEncoder` on `device` (eval mode), with `weights`
    (checkpoint names, loaded strictly: CheckpointError names a missing, unexpected or misshapen key) or, by
    default, `directory/model.safetensors`."""
    directory = Path(directory)
    if weights is None:
        check_clip_model_dir(directory, family, label=str(directory))
    elif not (directory / _config_file(family)).is_file():
        raise ConfigError(f"{directory}: no {_config_file(family)} in the {family} model directory")
    source: Mapping[str, Tensor] | Path = directory / WEIGHTS_NAME if weights is None else weights
    if family == "open_clip":
        encoder = open_clip_config_image_encoder(read_open_clip_config(directory), source,
                                                 label=str(directory / CONFIG_FILES["open_clip"]))
    elif PROJECTION in (source.keys() if isinstance(source, Mapping) else _keys(source)):
        encoder = hf_clip_image_encoder(directory, source)
    else:  # vision_model.* only: the pretrained projection from text.safetensors, frozen (or none at all)
        encoder = hf_clip_image_encoder(directory, source, projection=False)
        encoder.frozen_projection = _frozen_projection(directory)
    return encoder.to(device)


def _keys(path: Path) -> list[str]:
    with open_checkpoint(str(path)) as checkpoint:
        return list(checkpoint.keys())


def _frozen_projection(directory: Path) -> nn.Linear | None:
    """`visual_projection.weight` of `directory/text.safetensors` as a frozen bias-free linear layer, if there."""
    if not has_text_tower(directory):
        return None
    with open_checkpoint(str(directory / TEXT_NAME)) as checkpoint:
        if PROJECTION not in checkpoint.keys():
            return None
        weight = checkpoint.get(PROJECTION)
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data.copy_(weight)
    return layer.requires_grad_(False)


def clip_zeroshot_head(directory: Path, family: ClipKind, class_names: Sequence[str], templates: Sequence[str],
                       device: str | torch.device = "cpu") -> ClassificationHead:
    """The CLIP zero-shot head of `class_names` and `templates` (`mergeflow.families.clip.zeroshot`) from the text tower
    in `directory/text.safetensors`, computed on `device`. ConfigError naming the directory when it has no text
    tower (or, for hf_clip, no tokenizer files)."""
    directory = Path(directory)
    config_file = _config_file(family)
    if not (directory / config_file).is_file():
        raise ConfigError(f"{directory}: no {config_file} in the {family} model directory")
    if not has_text_tower(directory):
        raise _no_text_error(directory)
    if family == "open_clip":
        config = read_open_clip_config(directory)
        tokenizer = _open_clip_tokenizer(config, str(directory / config_file))
        model = _open_clip_model(config, str(directory / config_file))
        _load_text_tower(model, directory / TEXT_NAME, family)
        return open_clip_zeroshot_head(model.to(device).eval(), tokenizer, class_names, templates)
    from transformers import CLIPModel

    tokenizer = _hf_tokenizer(directory)
    model = CLIPModel(_hf_clip_config(directory))
    _load_text_tower(model, directory / TEXT_NAME, family)
    return hf_zeroshot_head(model.to(device).eval(), tokenizer, class_names, templates)
