"""`mergeflow convert --as`: the public task_vectors pickles (a whole ImageEncoder with `model.visual.*`, and
ClassificationHead linear layers) become the open_clip family's expert checkpoints and Mergeflow heads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mergeflow  # noqa: F401 - the torchvision fix runs before open_clip is imported
import open_clip
from safetensors.torch import load_file

from mergeflow_app.cli import main
from mergeflow.errors import CheckpointError
from mergeflow.heads import ClassificationHead

TINY = "mergeflow-test-convert-vit"
CONFIG = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8,
                                          "head_width": 16},
          "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("configs")
    (folder / f"{TINY}.json").write_text(json.dumps(CONFIG))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    return open_clip.create_model(TINY, pretrained=None).eval()


def test_task_vectors_image_encoder_becomes_its_visual_tower(clip, tmp_path: Path) -> None:
    wrapper = torch.nn.Module()  # task_vectors' ImageEncoder: the CLIP model under `model`, text transformer dropped
    wrapper.add_module("model", clip)
    pickled = tmp_path / "finetuned.pt"
    torch.save(wrapper, pickled)
    out = tmp_path / "expert.safetensors"
    assert main(["convert", "--as", "open_clip_visual", str(pickled), str(out)]) == 0
    converted = load_file(out)
    assert set(converted) == set(clip.visual.state_dict())
    for key, tensor in clip.visual.state_dict().items():
        torch.testing.assert_close(converted[key], tensor, rtol=0, atol=0)


def test_task_vectors_head_becomes_a_mergeflow_head(tmp_path: Path) -> None:
    torch.manual_seed(1)
    linear = torch.nn.Linear(16, 5)  # task_vectors' ClassificationHead: normalise, then this layer
    pickled = tmp_path / "head_MNIST.pt"
    torch.save(linear, pickled)
    out = tmp_path / "mnist.safetensors"
    assert main(["convert", "--as", "head", str(pickled), str(out)]) == 0
    head = ClassificationHead.load(out)
    features = F.normalize(torch.randn(3, 16), dim=-1)
    torch.testing.assert_close(head.logits(features), linear(features), rtol=1e-6, atol=1e-6)


def test_a_module_without_a_visual_tower_is_refused(tmp_path: Path) -> None:
    from mergeflow.checkpoints.convert import convert_legacy

    pickled = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)
    with pytest.raises(CheckpointError, match="not an open_clip image encoder"):
        convert_legacy(str(pickled), str(tmp_path / "x.safetensors"), kind="open_clip_visual")
    assert not (tmp_path / "x.safetensors").exists()
