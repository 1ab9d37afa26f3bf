"""CLIP model directories (open_clip and Hugging Face layouts) on tiny random models: the vision tower round-trips,
zero-shot heads from `text.safetensors` equal those of the full model, and errors name the file or key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

import mergeflow  # noqa: F401 - the torchvision fix runs before open_clip / transformers are imported
import open_clip
from transformers import AutoTokenizer

from mergeflow.families.clip.model_dir import (
    check_clip_model_dir,
    clip_zeroshot_head,
    has_text_tower,
    load_clip_image_encoder,
    read_open_clip_config,
    save_hf_clip_model_dir,
    save_open_clip_model_dir,
)
from mergeflow.families.clip.vision import hf_vision_state_dict, image_encoder_state_dict
from mergeflow.families.clip.zeroshot import hf_zeroshot_head, open_clip_zeroshot_head
from mergeflow.errors import CheckpointError, ConfigError
from tiny_clip import (
    EOS,
    OPEN_CLIP_CONFIG,
    clip_word_tokenizer,
    tiny_hf_clip,
    tiny_hf_clip_dir,
    tiny_open_clip,
    tiny_open_clip_dir,
)

NAMES = ["cat", "dog", "red car"]
TEMPLATES = ["a photo of a {}.", 'a photo of the number: "{}".', "a centered satellite photo of the {}."]


pytestmark = pytest.mark.usefixtures("isolated_and_single_threaded")


def _images() -> list[Image.Image]:
    g = np.random.default_rng(0)
    return [Image.fromarray(g.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(4)]


def _keys(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as file:
        return set(file.keys())


def _features(output) -> torch.Tensor:  # transformers 5 returns a model output, 4.x a tensor
    return output if isinstance(output, torch.Tensor) else output.pooler_output


# ---------------------------------------------------------------------------------------------- open_clip


def test_open_clip_dir_round_trip_equals_the_models_image_features(tmp_path: Path) -> None:
    model = tiny_open_clip(seed=3)
    save_open_clip_model_dir(model, OPEN_CLIP_CONFIG, tmp_path)
    assert json.loads((tmp_path / "open_clip_config.json").read_text()) == OPEN_CLIP_CONFIG
    full = set(model.state_dict())
    assert _keys(tmp_path / "model.safetensors") == set(model.visual.state_dict())
    assert _keys(tmp_path / "text.safetensors") == {k for k in full if not k.startswith("visual.")}
    assert {"logit_scale", "text_projection", "token_embedding.weight"} <= _keys(tmp_path / "text.safetensors")
    check_clip_model_dir(tmp_path, "open_clip", label="model")
    assert has_text_tower(tmp_path)

    encoder = load_clip_image_encoder(tmp_path, "open_clip")
    assert encoder.image_size == 32 and not encoder.training
    pixels = encoder.preprocess(_images())
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixels), model.encode_image(pixels, normalize=True))
        other = load_clip_image_encoder(tiny_open_clip_dir(tmp_path / "other", seed=4), "open_clip")
        assert not torch.allclose(other(pixels), encoder(pixels), atol=1e-3)

        merged = {k: v * 0.5 for k, v in image_encoder_state_dict(encoder).items()}  # weights given as a mapping
        model.visual.load_state_dict(merged)
        torch.testing.assert_close(load_clip_image_encoder(tmp_path, "open_clip", merged)(pixels),
                                   model.encode_image(pixels, normalize=True))

    hub = {"model_cfg": OPEN_CLIP_CONFIG, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(hub))  # open_clip's Hub file is read too
    encoder = load_clip_image_encoder(tmp_path, "open_clip")
    assert encoder.mean == (0.5, 0.5, 0.5) and encoder.std == (0.25, 0.25, 0.25)


def test_open_clip_zeroshot_head_from_the_dir_equals_the_full_models(tmp_path: Path) -> None:
    model = tiny_open_clip(seed=5)
    directory = tmp_path / "model"
    save_open_clip_model_dir(model, OPEN_CLIP_CONFIG, directory)
    configs = tmp_path / "configs"  # the reference tokenizer: open_clip's own, for the config under a name
    configs.mkdir()
    (configs / "mergeflow-test-model-dir.json").write_text(json.dumps(OPEN_CLIP_CONFIG))
    open_clip.add_model_config(configs)
    reference = open_clip_zeroshot_head(model, open_clip.get_tokenizer("mergeflow-test-model-dir"), NAMES, TEMPLATES)

    head = clip_zeroshot_head(directory, "open_clip", NAMES, TEMPLATES)
    torch.testing.assert_close(head.weight, reference.weight, atol=1e-6, rtol=1e-5)
    assert torch.equal(head.bias, torch.zeros(3)) and head.logit_scale == pytest.approx(reference.logit_scale)
    assert (head.weight @ head.weight.T).fill_diagonal_(0).abs().max() < 0.999  # distinct classes

    tiny_open_clip_dir(tmp_path / "other", seed=6)  # the text tower is really read from text.safetensors
    other = clip_zeroshot_head(tmp_path / "other", "open_clip", NAMES, TEMPLATES)
    assert not torch.allclose(other.weight, head.weight, atol=1e-3)


def test_save_open_clip_checks_the_config_against_the_model(tmp_path: Path) -> None:
    model = tiny_open_clip()
    wider = {**OPEN_CLIP_CONFIG, "vision_cfg": {**OPEN_CLIP_CONFIG["vision_cfg"], "width": 128}}
    with pytest.raises(ConfigError, match=r"does not match its config.*'visual.class_embedding': shape \(64,\)"):
        save_open_clip_model_dir(model, wider, tmp_path)
    with pytest.raises(ConfigError, match="no field 'text_cfg'"):
        save_open_clip_model_dir(model, {"embed_dim": 32, "vision_cfg": {}}, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------- Hugging Face


def test_hf_dir_round_trip_equals_the_models_image_features(tmp_path: Path) -> None:
    tokenizer = clip_word_tokenizer()
    model = tiny_hf_clip(len(tokenizer), seed=1)
    save_hf_clip_model_dir(model, tmp_path, tokenizer=tokenizer)
    vision = set(hf_vision_state_dict(model))
    assert _keys(tmp_path / "model.safetensors") == vision and "visual_projection.weight" in vision
    assert _keys(tmp_path / "text.safetensors") == set(model.state_dict()) - vision
    assert {"logit_scale", "text_projection.weight"} <= _keys(tmp_path / "text.safetensors")
    processor = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert processor["crop_size"] == {"height": 32, "width": 32}
    check_clip_model_dir(tmp_path, "hf_clip", label="model")

    encoder = load_clip_image_encoder(tmp_path, "hf_clip")
    assert encoder.image_size == 32
    assert sorted(image_encoder_state_dict(encoder)) == sorted(vision)
    pixels = encoder.preprocess(_images())
    with torch.no_grad():
        expected = F.normalize(_features(model.get_image_features(pixel_values=pixels)), dim=-1)
        torch.testing.assert_close(encoder(pixels), expected)
        assert encoder(pixels).shape == (4, 24)


def test_hf_vision_only_layout_keeps_the_pretrained_projection_frozen(tmp_path: Path) -> None:
    """FusionBench's experts are CLIPVisionModel checkpoints: only `vision_model.*` is fine-tuned and merged."""
    from mergeflow.families.clip.data import ImageSplit
    from mergeflow.families.clip.training import finetune_image_encoder
    from mergeflow.finetune import FinetuneSettings

    tokenizer = clip_word_tokenizer()
    model = tiny_hf_clip(len(tokenizer), seed=1)
    save_hf_clip_model_dir(model, tmp_path, tokenizer=tokenizer, merge_projection=False)
    vision = _keys(tmp_path / "model.safetensors")
    assert vision == set(hf_vision_state_dict(model)) - {"visual_projection.weight"}
    assert "visual_projection.weight" in _keys(tmp_path / "text.safetensors")

    encoder = load_clip_image_encoder(tmp_path, "hf_clip")
    assert sorted(image_encoder_state_dict(encoder)) == sorted(vision)
    pixels = encoder.preprocess(_images())
    with torch.no_grad():
        expected = F.normalize(_features(model.get_image_features(pixel_values=pixels)), dim=-1)
        torch.testing.assert_close(encoder(pixels), expected)
    head = clip_zeroshot_head(tmp_path, "hf_clip", NAMES, TEMPLATES[:1])
    assert head.weight.shape == (3, 24)

    split = ImageSplit(images=_images(), labels=[0, 1, 2, 0])
    result = finetune_image_encoder(encoder, head, split, FinetuneSettings(steps=3, batch_size=2, lr=1e-2),
                                    progress=False)
    assert set(result.state_dict) == vision
    assert not torch.equal(result.state_dict["vision_model.post_layernorm.weight"],
                           model.vision_model.post_layernorm.weight)
    torch.testing.assert_close(encoder.frozen_projection.weight, model.visual_projection.weight, rtol=0, atol=0)
    # an expert of only vision_model.* loads the same way, with the directory's frozen projection
    expert = load_clip_image_encoder(tmp_path, "hf_clip", result.state_dict)
    torch.testing.assert_close(expert.frozen_projection.weight, model.visual_projection.weight, rtol=0, atol=0)


def test_hf_zeroshot_head_from_the_dir_equals_the_full_models(tmp_path: Path) -> None:
    directory = tiny_hf_clip_dir(tmp_path / "model", seed=2)
    tokenizer = clip_word_tokenizer()
    model = tiny_hf_clip(len(tokenizer), seed=2)
    names = ["cat", "dog", "3"]
    reference = hf_zeroshot_head(model, tokenizer, names, TEMPLATES)
    head = clip_zeroshot_head(directory, "hf_clip", names, TEMPLATES)
    torch.testing.assert_close(head.weight, reference.weight, atol=1e-6, rtol=1e-5)
    assert head.logit_scale == pytest.approx(reference.logit_scale) and torch.equal(head.bias, torch.zeros(3))

    loaded = AutoTokenizer.from_pretrained(directory)  # a real tokenizer: known words, pooled at <|endoftext|>
    ids = loaded(['a photo of the number: "3".'])["input_ids"][0]
    assert 1 not in ids and ids[-1] == EOS
    with torch.no_grad():
        one = _features(model.get_text_features(**loaded(["a photo of a cat."], return_tensors="pt")))
    single = clip_zeroshot_head(directory, "hf_clip", ["cat"], ["a photo of a {}."])
    torch.testing.assert_close(single.weight, F.normalize(one, dim=-1), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- errors


def test_check_clip_model_dir_names_the_label_and_missing_file(tmp_path: Path) -> None:
    directory = tiny_open_clip_dir(tmp_path / "oc")
    with pytest.raises(ConfigError, match=r"pretrained: the open_clip model directory .*missing does not exist"):
        check_clip_model_dir(tmp_path / "missing", "open_clip", label="pretrained")
    with pytest.raises(ConfigError, match="pretrained: no config.json in the hf_clip model directory"):
        check_clip_model_dir(directory, "hf_clip", label="pretrained")
    with pytest.raises(ConfigError, match="unknown CLIP family 'clip'"):
        check_clip_model_dir(directory, "clip", label="pretrained")  # type: ignore[arg-type]
    (directory / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="pretrained: no model.safetensors in the open_clip model directory"):
        check_clip_model_dir(directory, "open_clip", label="pretrained")
    with pytest.raises(ConfigError, match="no model.safetensors"):
        load_clip_image_encoder(directory, "open_clip")
    (directory / "open_clip_config.json").unlink()
    with pytest.raises(ConfigError, match="pretrained: no open_clip_config.json"):
        check_clip_model_dir(directory, "open_clip", label="pretrained")
    (directory / "open_clip_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="open_clip_config.json: not valid JSON"):
        clip_zeroshot_head(directory, "open_clip", NAMES, TEMPLATES)


def test_a_dir_without_a_text_tower_has_no_zeroshot_heads(tmp_path: Path) -> None:
    model = tiny_open_clip()
    save_open_clip_model_dir(model, OPEN_CLIP_CONFIG, tmp_path)
    save_open_clip_model_dir(model, OPEN_CLIP_CONFIG, tmp_path, text=False)  # drops the earlier text tower
    assert not has_text_tower(tmp_path)
    load_clip_image_encoder(tmp_path, "open_clip")  # the vision tower alone still loads
    with pytest.raises(ConfigError, match=r"no text.safetensors.*give each task a `head`, or add text.safetensors") \
            as error:
        clip_zeroshot_head(tmp_path, "open_clip", NAMES, TEMPLATES)
    assert str(tmp_path) in str(error.value)

    hf = tmp_path / "hf"
    save_hf_clip_model_dir(tiny_hf_clip(64), hf, text=False)
    assert not has_text_tower(hf)
    with pytest.raises(ConfigError, match="no text.safetensors"):
        clip_zeroshot_head(hf, "hf_clip", NAMES, TEMPLATES)
    save_hf_clip_model_dir(tiny_hf_clip(64), hf)  # a text tower, but no tokenizer files
    with pytest.raises(ConfigError, match="no tokenizer files"):
        clip_zeroshot_head(hf, "hf_clip", NAMES, TEMPLATES)


def test_weights_with_a_wrong_key_or_shape_are_named(tmp_path: Path) -> None:
    oc = tiny_open_clip_dir(tmp_path / "oc")
    state = image_encoder_state_dict(load_clip_image_encoder(oc, "open_clip"))
    state["ln_post.weights"] = state.pop("ln_post.weight")
    with pytest.raises(CheckpointError, match="ln_post.weight") as error:
        load_clip_image_encoder(oc, "open_clip", state)
    assert error.value.tensor == "ln_post.weight" and "ln_post.weights" in str(error.value)

    hf = tiny_hf_clip_dir(tmp_path / "hf")
    state = image_encoder_state_dict(load_clip_image_encoder(hf, "hf_clip"))
    state["visual_projection.weight"] = torch.zeros(24, 16)
    with pytest.raises(CheckpointError, match=r"shape \(24, 16\)") as error:
        load_clip_image_encoder(hf, "hf_clip", state)
    assert error.value.tensor == "visual_projection.weight"

    shutil.copy(oc / "model.safetensors", oc / "text.safetensors")  # the vision tower where the text one belongs
    with pytest.raises(CheckpointError, match="does not fit the text tower") as error:
        clip_zeroshot_head(oc, "open_clip", NAMES, TEMPLATES)
    assert "text.safetensors" in str(error.value) and error.value.tensor is not None


def test_open_clip_config_by_model_name_uses_the_bundled_config(tmp_path: Path) -> None:
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_name": "ViT-B-32", "quick_gelu": True}))
    config = read_open_clip_config(tmp_path)
    assert config == {**open_clip.get_model_config("ViT-B-32"), "quick_gelu": True}
    assert config["vision_cfg"]["patch_size"] == 32 and config["embed_dim"] == 512
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_name": "ViT-B-99"}))
    with pytest.raises(ConfigError, match=r"open_clip_config.json: model_name 'ViT-B-99' is not an open_clip model "
                                          r"config \(for example ViT-"):
        read_open_clip_config(tmp_path)
