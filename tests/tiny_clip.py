"""Tiny CLIP model directories built offline (random weights, 32-pixel images): open_clip and Hugging Face."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

import mergeflow  # noqa: F401 - the torchvision fix runs before open_clip / transformers are imported
from open_clip.model import CLIP
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, PreTrainedTokenizerFast

from mergeflow.families.clip.model_dir import save_hf_clip_model_dir, save_open_clip_model_dir
from mergeflow.families.clip.templates import TEMPLATES

OPEN_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
SPECIAL_TOKENS = ["<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"]
PAD, UNK, BOS, EOS = range(4)
EXTRA_WORDS = ("cat", "dog", "car", "red", "forest", "sea", "lake", "highway", "zero", "one", "two")


def tiny_open_clip(seed: int = 0) -> CLIP:
    """A random open_clip CLIP of `OPEN_CLIP_CONFIG` (ViT of 2 layers, width 64; 1-layer text tower), eval mode."""
    torch.manual_seed(seed)
    return CLIP(**OPEN_CLIP_CONFIG).eval()


def tiny_open_clip_dir(directory: Path, seed: int = 0) -> Path:
    """Write the open_clip model directory of `tiny_open_clip(seed)` (text tower included); returns it."""
    save_open_clip_model_dir(tiny_open_clip(seed), OPEN_CLIP_CONFIG, Path(directory))
    return Path(directory)


def clip_word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer (whitespace and punctuation split) over the words of every CLIP prompt template, the
    digits and a few class names: <pad>=0, <unk>=1, <|startoftext|>=2, <|endoftext|>=3 around each text."""
    words = {word for templates in TEMPLATES.values() for template in templates
             for word in re.findall(r"\w+|[^\w\s]+", template.format("x").lower())}
    words |= {str(digit) for digit in range(10)} | set(EXTRA_WORDS)
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *sorted(words)])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", BOS), ("<|endoftext|>", EOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<|startoftext|>", eos_token="<|endoftext|>")


def tiny_hf_clip(vocab_size: int, seed: int = 0) -> CLIPModel:
    """A random Hugging Face CLIPModel: 2-layer towers of width 32 (4 heads), 8-pixel patches of 32-pixel images,
    projection 24, text of at most 32 tokens with the ids of `clip_word_tokenizer`."""
    torch.manual_seed(seed)
    text = CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=32, bos_token_id=BOS, eos_token_id=EOS,
                          pad_token_id=PAD)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    return CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=24)).eval()


def tiny_hf_clip_dir(directory: Path, seed: int = 0, *, merge_projection: bool = True) -> Path:
    """Write the hf_clip model directory (tokenizer and text tower included) of a random tiny CLIPModel; returns
    it. `merge_projection=False`: the FusionBench layout, `visual_projection` frozen in text.safetensors."""
    directory = Path(directory)
    tokenizer = clip_word_tokenizer()
    save_hf_clip_model_dir(tiny_hf_clip(len(tokenizer), seed), directory, tokenizer=tokenizer,
                           merge_projection=merge_projection)
    loaded = AutoTokenizer.from_pretrained(directory)
    assert loaded("a photo of a 3.")["input_ids"][-1] == EOS and loaded.pad_token_id == PAD
    return directory
