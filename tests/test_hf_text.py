"""The MiniLM adapter on the real checkpoint: state dict matches the base file, strict loading, pooled features."""

import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mergeflow.families.text.encoder import TextEncoder, encoder_state_dict, load_text_encoder, minilm_path


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return minilm_path()


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> tuple:
    return load_text_encoder(model_dir)


def test_minilm_path_is_offline(model_dir: Path) -> None:
    assert (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"


def test_state_dict_matches_base_checkpoint(model_dir: Path, loaded: tuple) -> None:
    encoder, _ = loaded
    state = encoder_state_dict(encoder)
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as file:
        assert sorted(state) == sorted(file.keys())
        assert len(state) == 104
        for key in file.keys():
            base = file.get_tensor(key)
            assert state[key].shape == base.shape and state[key].dtype == base.dtype, key
            assert torch.equal(state[key], base), key
    assert state["embeddings.position_ids"].dtype == torch.int64
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in state.values())


def test_state_dict_is_a_copy(loaded: tuple) -> None:
    encoder, _ = loaded
    state = encoder_state_dict(encoder)
    before = state["embeddings.LayerNorm.bias"].clone()
    with torch.no_grad():
        encoder.backbone.embeddings.LayerNorm.bias.add_(1.0)
    try:
        assert torch.equal(state["embeddings.LayerNorm.bias"], before)
    finally:
        with torch.no_grad():
            encoder.backbone.embeddings.LayerNorm.bias.sub_(1.0)


def test_load_given_state_dict(model_dir: Path) -> None:
    state = load_file(model_dir / "model.safetensors")
    state["encoder.layer.3.output.dense.bias"] = state["encoder.layer.3.output.dense.bias"] + 0.5
    encoder, _ = load_text_encoder(model_dir, state)
    assert torch.equal(
        encoder_state_dict(encoder)["encoder.layer.3.output.dense.bias"], state["encoder.layer.3.output.dense.bias"]
    )


def test_wrong_keys_are_named(model_dir: Path) -> None:
    state = load_file(model_dir / "model.safetensors")
    state["encoder.layer.0.attention.self.qkv.weight"] = state.pop("encoder.layer.0.attention.self.query.weight")
    with pytest.raises(ValueError) as error:
        load_text_encoder(model_dir, state)
    assert "encoder.layer.0.attention.self.query.weight" in str(error.value)
    assert "encoder.layer.0.attention.self.qkv.weight" in str(error.value)

    state = load_file(model_dir / "model.safetensors")
    del state["embeddings.position_ids"]
    with pytest.raises(ValueError, match="embeddings.position_ids"):
        load_text_encoder(model_dir, state)


def test_features_are_unit_and_ignore_padding(loaded: tuple) -> None:
    encoder, tokenizer = loaded
    assert isinstance(encoder, TextEncoder) and not encoder.training
    texts = ["the match ended in a draw", "a much longer sentence about the central bank raising interest rates again"]
    with torch.no_grad():
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        together = encoder(batch["input_ids"], batch["attention_mask"])
        alone = tokenizer(texts[:1], return_tensors="pt")
        single = encoder(alone["input_ids"], alone["attention_mask"])
    assert together.shape == (2, 384)
    torch.testing.assert_close(together.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(together[0], single[0], atol=1e-5, rtol=0)  # padding does not leak into the mean
    assert float(together[0] @ together[1]) < 0.9
