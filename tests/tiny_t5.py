"""A tiny T5 model folder built offline: a word-level tokenizer trained on the given texts and a random T5."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

import mergeflow  # noqa: F401 - the torchvision fix runs before transformers is imported
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

from mergeflow.families.seq2seq.model import save_seq2seq_model_dir

PAD, EOS, UNK = 0, 1, 2
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]


def word_tokenizer(texts: Sequence[str], *, min_frequency: int = 1,
                   keep: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """One id per lower-cased word (whitespace/punctuation-separated) seen `min_frequency` times in `texts`, and
    every word of `keep` (label words); <pad>=0, </s>=1, <unk>=2 for the rest, `</s>` appended."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=min_frequency)
    tokenizer.train_from_iterator([*texts, *[" ".join(keep)] * min_frequency], trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", EOS)])
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [PAD, EOS, UNK]
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny_t5(vocab_size: int, seed: int = 0) -> T5ForConditionalGeneration:
    """d_model 32, 2 encoder and 2 decoder layers of 4 heads, d_ff 64, no dropout, tied embeddings (T5's default)."""
    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=4, dropout_rate=0.0, decoder_start_token_id=PAD, pad_token_id=PAD,
                      eos_token_id=EOS)
    return T5ForConditionalGeneration(config).eval()


def tiny_t5_model_dir(directory: Path, texts: Sequence[str], seed: int = 0, *, min_frequency: int = 1,
                      keep: Sequence[str] = ()) -> Path:
    """Write a tiny T5 folder (config.json, tokenizer files, model.safetensors) whose vocabulary is the words of
    `texts` (those seen `min_frequency` times) and of `keep`; returns `directory`."""
    directory = Path(directory)
    tokenizer = word_tokenizer(texts, min_frequency=min_frequency, keep=keep)
    save_seq2seq_model_dir(tiny_t5(len(tokenizer), seed), tokenizer, directory)
    loaded = AutoTokenizer.from_pretrained(directory)
    assert loaded.pad_token_id == PAD and loaded.eos_token_id == EOS and loaded("a")["input_ids"][-1] == EOS
    return directory
