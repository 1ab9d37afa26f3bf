"""The reproduction configs of the papers' tables: valid, complete (every registered method), and in the
literature's protocol (TIES disjoint sum with lambda 0.3, DOGE eta 0.07 for vision and 0.15 for NLP, AdaMerging on
the unlabeled test split, Fisher on at most 1000 validation examples)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergeflow.config import load_run_config
from mergeflow.mergekit_config import GTA, OTHER
from mergeflow.methods import METHODS

MERGEKIT = {name for name, _, _ in GTA.values()} | set(OTHER.values())  # mergekit's methods (configs/demo-mergekit.yaml)
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VISION = ["sun397", "stanford_cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
GLUE = ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb"]
SETTINGS = {"clip-vit-b32-ta8.yaml": ("open_clip", VISION, 0.07), "clip-vit-l14-ta8.yaml": ("open_clip", VISION, 0.07),
            "flan-t5-base-glue8.yaml": ("seq2seq", GLUE, 0.15)}


@pytest.mark.parametrize("file_name", sorted(SETTINGS))
def test_reproduction_config_follows_the_literature(file_name: str) -> None:
    family, tasks, eta = SETTINGS[file_name]
    config = load_run_config(CONFIGS / file_name)
    assert config.model.family == family and config.model.pretrained.startswith("s3://")
    assert [t.name for t in config.tasks] == tasks
    assert all(t.expert and t.dataset for t in config.tasks)
    assert {spec.method for spec in config.merges} == set(METHODS) - MERGEKIT  # the papers' catalogue
    plain = {spec.method: spec.params for spec in config.merges if spec.sweep is None}
    assert plain["ties"] == {"density": 0.2, "merge": "sum", "scaling": 0.3}
    assert plain["task_arithmetic"] == {"scaling": 0.3}
    assert plain["doge_ta"]["eta"] == eta and plain["doge_am"]["eta"] == eta
    assert plain["wudi"].get("steps", 400) == 400 and plain["iso_cts"].get("common_space_fraction", 0.8) == 0.8
    swept = {spec.method: spec.grid() for spec in config.merges if spec.sweep is not None}
    if family == "open_clip":  # the frontier papers pick alpha on validation from 0.1-3.0
        assert set(swept) == {"task_arithmetic", "ties", "tsv", "iso_c", "iso_cts"}
        assert all(swept[m]["alpha"] == [round(0.1 * i, 1) for i in range(1, 31)] for m in ("tsv", "iso_c", "iso_cts"))
        assert plain["iso_c"]["alpha"] == plain["iso_cts"]["alpha"] == 1.5 and plain["tsv"] == {}
    else:
        assert set(swept) == {"task_arithmetic", "ties"}
    assert config.statistics.unlabeled_split == "test" and config.statistics.max_examples == 1000
    assert config.statistics.split == "validation" and config.tuning.rule == "norm_acc.avg"


def test_vision_tasks_have_their_clip_templates_and_glue_tasks_their_prompts() -> None:
    from mergeflow.families.clip.templates import templates_for
    from mergeflow.families.seq2seq.scoring import GLUE_TASKS

    assert all(len(templates_for(task)) >= 1 for task in VISION)
    assert [GLUE_TASKS[task].metric for task in GLUE] == ["matthews"] + ["accuracy"] * 6 + ["spearman"]
