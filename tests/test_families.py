"""The model families' checks that run before any model loads: directory layouts, dataset layouts, heads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergeflow.errors import ConfigError
from mergeflow.families import FAMILIES, get_family


def test_every_family_is_registered_under_its_config_name() -> None:
    from typing import get_args

    from mergeflow.config import FamilyName

    assert set(FAMILIES) == set(get_args(FamilyName))
    with pytest.raises(ConfigError, match="unknown model family 'gpt'; known: hf_text, open_clip"):
        get_family("gpt")


@pytest.mark.parametrize(("family", "files", "missing"), [
    ("hf_text", [], "config.json, model.safetensors"),
    ("hf_text", ["config.json"], "model.safetensors"),
    ("seq2seq", ["model.safetensors"], "config.json"),
])
def test_hugging_face_layouts_name_every_missing_file(tmp_path: Path, family: str, files: list[str],
                                                      missing: str) -> None:
    for name in files:
        (tmp_path / name).write_text("{}")
    with pytest.raises(ConfigError, match=f"^model.pretrained \\(x\\): no {missing} in the model directory"):
        get_family(family).check_model_dir(tmp_path, "model.pretrained (x)")


def test_weights_false_needs_only_the_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    get_family("seq2seq").check_model_dir(tmp_path, "m", weights=False)
    get_family("hf_clip").check_model_dir(tmp_path, "m", weights=False)
    with pytest.raises(ConfigError, match="^m: no open_clip_config.json in the model directory"):
        get_family("open_clip").check_model_dir(tmp_path, "m", weights=False)


def test_dataset_layout_errors_say_what_was_expected(tmp_path: Path) -> None:
    (tmp_path / "task.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(ConfigError, match=r"expected classes.json and train/validation/test.parquet"):
        get_family("open_clip").read_dataset(tmp_path, "x")
    with pytest.raises(ConfigError, match=r"expected task.json \(name; template"):
        get_family("seq2seq").read_dataset(tmp_path, "x")


def test_a_seq2seq_head_is_a_prompt_file(tmp_path: Path) -> None:
    from mergeflow.families.seq2seq.scoring import GLUE_TASKS
    from mergeflow.families.seq2seq.family import save_prompt

    family = get_family("seq2seq")
    save_prompt(GLUE_TASKS["cola"], tmp_path / "cola.json")
    assert family.load_head(tmp_path / "cola.json", "h") == GLUE_TASKS["cola"]
    (tmp_path / "bad.json").write_text(json.dumps({"name": "cola"}))
    with pytest.raises(ConfigError, match=r"^tasks\[cola\].head: not a seq2seq task prompt"):
        family.load_head(tmp_path / "bad.json", "tasks[cola].head")


@pytest.mark.parametrize(("files", "missing"), [
    ([], "no config.json"),
    (["config.json"], "no tokenizer files"),
    (["config.json", "tokenizer.json"], "no model.safetensors or model.safetensors.index.json"),
    (["config.json", "vocab.json"], "no tokenizer files"),  # a GPT-2 tokenizer needs its merges too
])
def test_a_causal_lm_folder_names_what_it_lacks(tmp_path: Path, files: list[str], missing: str) -> None:
    for name in files:
        (tmp_path / name).write_text('{"model_type": "llama"}' if name == "config.json" else "{}")
    with pytest.raises(ConfigError, match=f"^model.pretrained \\(x\\): {missing}"):
        get_family("causal_lm").check_model_dir(tmp_path, "model.pretrained (x)")


def test_a_causal_lm_folder_without_weights_needs_its_config_and_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_text("{}")
    get_family("causal_lm").check_model_dir(tmp_path, "m", weights=False)
