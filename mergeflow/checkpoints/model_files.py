"""The files that make a weights directory a Hugging Face model directory (configs, tokenizers; never weights),
copied from the base's into a merge's output so that it loads with `from_pretrained`."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergeflow.content_cache import ContentCache
from mergeflow.storage import filesystem, join


# What makes a weights directory a Hugging Face model directory: copied from the base's, so the merge loads with
# `from_pretrained` (configs and tokenizers; never weights).
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
               "tokenizer.model", "chat_template.jinja", "preprocessor_config.json")


def copy_model_files(base: str, directory: Path, storage_options: Mapping[str, Any] | None,
                     cache: ContentCache) -> dict[str, str]:
    """Copy the base's model files (`MODEL_FILES`, when a config.json lies beside its weights) into `directory`;
    returns {name: sha256} of those copied."""
    folder = base if not base.lower().endswith((".safetensors", ".json", ".bin", ".pt", ".pth")) \
        else (base.rsplit("/", 1)[0] if "/" in base else ".")
    fs, path = filesystem(folder, storage_options)
    present = {entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)}
    if "config.json" not in present:
        return {}
    copied = {}
    for name in MODEL_FILES:
        if name in present:
            local = cache.fetch(join(folder, name), storage_options)
            shutil.copyfile(local.path, directory / name)
            copied[name] = local.sha256
    return copied
