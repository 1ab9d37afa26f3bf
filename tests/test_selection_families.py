"""Selection never reads a test split, on the CLIP and seq2seq families too (the flow tests check the text family):
a sweep point of a scaling method and one of a learned method (its objective on the unlabeled validation inputs),
as the flow's sweeps and `auto` searches score them, read only validation splits. Tiny models, a few examples."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergeflow  # noqa: F401 - the torchvision fix runs before open_clip / transformers are imported


def _store(tmp_path: Path):
    from mergeflow.content_cache import ContentCache
    from mergeflow.stages.store import Store

    return Store(str(tmp_path / "store"), {}, ContentCache(tmp_path / "cache"))


def _ref(store, path: Path, recursive: bool = False):
    """The reference of a local file or directory (a directory's digest over its files, as the store reads it)."""
    from mergeflow.stages.refs import ObjectRef
    from mergeflow.storage import directory_digest, fetch_directory, sha256_file

    if path.is_file():
        return ObjectRef(uri=str(path), sha256=sha256_file(path))
    _, files = fetch_directory(str(path), store.cache, recursive=recursive)
    return ObjectRef(uri=str(path), sha256=directory_digest(files))


def _experts(store, base_dir: Path, names: list[str], tmp_path: Path) -> dict:
    """One expert per task: the base's weights moved a little, seeded."""
    base = load_file(str(base_dir / "model.safetensors"))
    experts = {}
    for i, name in enumerate(names):
        g = torch.Generator().manual_seed(i)
        weights = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                   for k, v in base.items()}
        path = tmp_path / "experts" / f"{name}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(path))
        experts[name] = store.checkpoint_ref(str(path))
    return experts


def _open_clip(tmp_path: Path, store):
    from mergeflow.families.clip.data import ImageSplitSizes, load_digits_task, save_image_task
    from mergeflow.families.clip.model_dir import clip_zeroshot_head
    from mergeflow.families.clip.templates import templates_for
    from tiny_clip import tiny_open_clip_dir

    base_dir = tiny_open_clip_dir(tmp_path / "model")
    head = tmp_path / "heads" / "digits.safetensors"
    head.parent.mkdir()
    clip_zeroshot_head(base_dir, "open_clip", [str(d) for d in range(10)], templates_for("digits")).save(head)
    tasks = {}
    for i, name in enumerate(("digits-a", "digits-b")):
        data = tmp_path / "data" / name
        save_image_task(load_digits_task(seed=i, sizes=ImageSplitSizes(train=4, validation=6, test=6)), str(data))
        tasks[name] = (_ref(store, data, recursive=True), _ref(store, head))
    return "open_clip", base_dir, tasks


def _seq2seq(tmp_path: Path, store):
    from mergeflow.families.seq2seq.data import save_seq2seq_task
    from mergeflow.families.seq2seq.family import save_prompt
    from mergeflow.families.seq2seq.scoring import GlueTask
    from tiny_t5 import tiny_t5_model_dir

    texts = {"train": ["a fine film", "a dull film"], "validation": ["truly fine", "truly dull", "fine fine"],
             "test": ["never seen words", "held out text", "test only"]}
    labels = {"train": [1, 0], "validation": [1, 0, 1], "test": [0, 1, 0]}
    prompt = GlueTask("sst2", "sst2 sentence: {sentence}", ("negative", "positive"), "accuracy")
    base_dir = tiny_t5_model_dir(tmp_path / "model", [t for split in texts.values() for t in split],
                                 keep=prompt.label_words)
    head = tmp_path / "heads" / "sst2.json"
    head.parent.mkdir()
    save_prompt(prompt, head)
    tasks = {}
    for name in ("sst2-a", "sst2-b"):
        data = tmp_path / "data" / name
        save_seq2seq_task(name, prompt, {s: [{"sentence": t} for t in rows] for s, rows in texts.items()}, labels,
                          str(data))
        tasks[name] = (_ref(store, data, recursive=True), _ref(store, head))
    return "seq2seq", base_dir, tasks


@pytest.mark.parametrize("make", [_open_clip, _seq2seq], ids=["open_clip", "seq2seq"])
def test_sweep_points_read_only_validation_splits(make, tmp_path, split_reads) -> None:
    from mergeflow.config import EvalConfig, TuningConfig
    from mergeflow.stages.refs import ModelRef
    from mergeflow.stages.sweep import sweep_point

    store = _store(tmp_path)
    family, base_dir, tasks = make(tmp_path, store)
    base = ModelRef(**_ref(store, base_dir).model_dump(), family=family)
    experts = _experts(store, base_dir, list(tasks), tmp_path)
    tuning, evaluation = TuningConfig(max_examples=4), EvalConfig(batch_size=8, max_length=16)
    split_reads.clear()  # what building the fixtures read does not count

    scaled, reused = sweep_point("task_arithmetic", {"scaling": 0.5}, base, experts, tasks, tuning, evaluation,
                                 store, "cpu")
    assert set(scaled["accuracy"]) == set(tasks) and not reused
    if family != "seq2seq":  # classification under a head: each example's credit, as many as scored
        assert set(scaled["correct"]) == set(tasks)
        assert all(0 < len(c) <= 4 and set(c) <= {"0", "1"} for c in scaled["correct"].values())
        assert {t: c.count("1") / len(c) for t, c in scaled["correct"].items()} == pytest.approx(scaled["accuracy"])
    learned, _ = sweep_point("adamerging", {"steps": 1, "granularity": "task"}, base, experts, tasks, tuning,
                             evaluation, store, "cpu", learn_on="validation")
    assert set(learned["accuracy"]) == set(tasks)

    splits = [split for _, split in split_reads]
    assert splits and set(splits) == {"validation"}, split_reads


def test_a_learned_point_continues_the_fit_of_a_point_with_fewer_steps(tmp_path, monkeypatch) -> None:
    """AdaMerging's warm start through the sweep stage, its objective on CLIP validation inputs: the 3-step point
    continues the 1-step point's fit (2 steps run), and its weights are those of a 3-step fit from scratch."""
    import mergeflow.coefficients as coefficients
    from mergeflow.config import EvalConfig
    from mergeflow.stages.refs import ModelRef
    from mergeflow.stages.sweep import sweep_weights

    first = _store(tmp_path)
    family, base_dir, tasks = _open_clip(tmp_path, first)
    base = ModelRef(**_ref(first, base_dir).model_dump(), family=family)
    experts = _experts(first, base_dir, list(tasks), tmp_path)
    unlabeled = (tasks, "validation", EvalConfig(batch_size=8, max_length=16))
    steps, merge_with = [], coefficients.merge_with
    monkeypatch.setattr(coefficients, "merge_with", lambda *args: steps.append(1) or merge_with(*args))
    learn = {"granularity": "task", "init": 0.2}

    scratch = sweep_weights("adamerging", {**learn, "steps": 3}, base, experts, first, "cpu", unlabeled=unlabeled)
    assert len(steps) == 3
    second = _store(tmp_path / "second")  # its own cache: nothing kept yet
    sweep_weights("adamerging", {**learn, "steps": 1}, base, experts, second, "cpu", unlabeled=unlabeled)
    steps.clear()
    continued = sweep_weights("adamerging", {**learn, "steps": 3}, base, experts, second, "cpu", unlabeled=unlabeled)
    assert len(steps) == 2
    assert continued.keys() == scratch.keys()
    for name, tensor in scratch.items():
        assert torch.equal(continued[name], tensor), name
    other = (tasks, "test", unlabeled[2])  # another objective is another problem: it starts over
    steps.clear()
    sweep_weights("adamerging", {**learn, "steps": 3}, base, experts, second, "cpu", unlabeled=other)
    assert len(steps) == 3
