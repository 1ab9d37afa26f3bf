"""Tiny causal-LM folders built offline: a byte-level BPE tokenizer trained on the given real texts, and a random
Llama, GPT-2 or Qwen2 of a few tens of thousands of parameters."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

import mergeflow  # noqa: F401 - the torchvision fix runs before transformers is imported
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from mergeflow.families.causal_lm.model_dir import save_causal_lm_dir

EOS = "<|endoftext|>"


def bpe_tokenizer(texts: Sequence[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """GPT-2-style byte-level BPE of `vocab_size` ids learnt from `texts` (any text encodes: every byte has an id);
    `<|endoftext|>` (id 0) is BOS and EOS, there is no padding token (as GPT-2)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    assert tokenizer.token_to_id(EOS) == 0
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS)


def tiny_config(architecture: str, vocab_size: int, *, tie: bool | None = None):
    """Hidden 32, 2 layers of 4 heads (2 key-value heads where the architecture has them), 256 positions."""
    if architecture == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256, bos_token_id=0,
                          eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                          tie_word_embeddings=True if tie is None else tie)
    shared = {"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
              "bos_token_id": 0, "eos_token_id": 0}
    if architecture == "llama":
        return LlamaConfig(**shared, tie_word_embeddings=False if tie is None else tie)
    if architecture == "qwen2":
        return Qwen2Config(**shared, tie_word_embeddings=True if tie is None else tie)
    if architecture == "mistral":
        return MistralConfig(**shared, sliding_window=None, tie_word_embeddings=False if tie is None else tie)
    raise ValueError(architecture)


def tiny_causal_lm(architecture: str, vocab_size: int, seed: int = 0, *, tie: bool | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = tiny_config(architecture, vocab_size, tie=tie)
    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config).to(dtype).eval()


def tiny_causal_lm_dir(directory: Path, architecture: str, texts: Sequence[str], seed: int = 0, *,
                       vocab_size: int = 512, tie: bool | None = None, dtype: torch.dtype = torch.float32,
                       shard_size: int | str = "2GB") -> Path:
    """Write a tiny causal-LM folder whose tokenizer was trained on `texts`; returns `directory`."""
    tokenizer = bpe_tokenizer(texts, vocab_size)
    model = tiny_causal_lm(architecture, len(tokenizer), seed, tie=tie, dtype=dtype)
    save_causal_lm_dir(model, tokenizer, Path(directory), shard_size=shard_size)
    return Path(directory)
