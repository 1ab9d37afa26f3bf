"""Parameter selection heuristics (open_clip, HF BERT/CLIP, T5 names) and the SVD helpers."""

from __future__ import annotations

import pytest
import torch

from mergeflow.checkpoints import TensorInfo
from mergeflow.selection import ParameterSelection, ParamKind, classify


def info(name, shape=(4, 4), dtype=torch.float32):
    return TensorInfo(name, shape, dtype)


@pytest.mark.parametrize("name,shape,kind", [
    ("visual.transformer.resblocks.0.attn.in_proj_weight", (2304, 768), ParamKind.LINEAR_WEIGHT),
    ("visual.transformer.resblocks.0.attn.in_proj_bias", (2304,), ParamKind.BIAS),
    ("visual.transformer.resblocks.0.mlp.c_fc.weight", (3072, 768), ParamKind.LINEAR_WEIGHT),
    ("visual.transformer.resblocks.0.ln_1.weight", (768,), ParamKind.NORM),
    ("visual.ln_post.bias", (768,), ParamKind.NORM),
    ("visual.positional_embedding", (50, 768), ParamKind.EMBEDDING),
    ("visual.class_embedding", (768,), ParamKind.EMBEDDING),
    ("visual.conv1.weight", (768, 3, 32, 32), ParamKind.OTHER),
    ("visual.proj", (768, 512), ParamKind.OTHER),
    ("encoder.layer.0.attention.self.query.weight", (384, 384), ParamKind.LINEAR_WEIGHT),
    ("encoder.layer.0.attention.output.LayerNorm.weight", (384,), ParamKind.NORM),
    ("embeddings.word_embeddings.weight", (30522, 384), ParamKind.EMBEDDING),
    ("vision_model.encoder.layers.0.layer_norm1.weight", (768,), ParamKind.NORM),
    ("vision_model.encoder.layers.0.self_attn.k_proj.weight", (768, 768), ParamKind.LINEAR_WEIGHT),
    ("encoder.block.0.layer.0.SelfAttention.q.weight", (768, 768), ParamKind.LINEAR_WEIGHT),
    ("shared.weight", (32128, 768), ParamKind.EMBEDDING),
])
def test_classify(name, shape, kind):
    assert classify(info(name, shape)) == kind


def test_non_float_buffers_are_never_selected():
    pos = info("embeddings.position_ids", (1, 512), torch.int64)
    assert classify(pos) == ParamKind.NON_FLOAT
    assert not ParameterSelection(include=(".*",)).selects(pos)


def test_selection_patterns_override_kinds():
    infos = [info("a.q.weight"), info("a.v.weight"), info("a.bias", (4,)), info("a.ln_1.weight", (4,))]
    assert ParameterSelection().select(infos) == ["a.q.weight", "a.v.weight"]
    assert ParameterSelection(exclude=(r"\.v\.",)).select(infos) == ["a.q.weight"]
    assert ParameterSelection(include=(r"bias$",)).select(infos) == ["a.q.weight", "a.v.weight", "a.bias"]
    with pytest.raises(ValueError, match="pattern"):
        ParameterSelection(include=("(",))
