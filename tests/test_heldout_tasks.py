"""benchmarks/heldout_tasks.py: the second `auto` benchmark's five real tasks, clean and with leaky validation."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import heldout_tasks  # noqa: E402

from mergeflow.families.text.data import read_text_task  # noqa: E402
from mergeflow.hygiene import overlap  # noqa: E402
from mergeflow.families import get_family  # noqa: E402


def test_the_tasks_split_disjointly_and_only_the_named_ones_leak(tmp_path_factory):
    out = tmp_path_factory.mktemp("heldout")
    sizes = heldout_tasks.Sizes(train=120, validation=30, test=40)
    made = heldout_tasks.build(out, tmp_path_factory.getbasetemp() / "wheels", sizes)
    assert set(made) == {"clean", "overlap"} and len(made["clean"]) == 5
    text = get_family("hf_text")
    for variant, tasks in made.items():
        for name, directory in tasks.items():
            task = read_text_task(directory)
            s = task.splits
            assert [len(s[k].texts) for k in ("train", "validation", "test")] == [120, 30, 40], (variant, name)
            assert set(s["test"].labels) == set(range(len(task.class_names))), (variant, name)
            assert not set(s["test"].texts) & (set(s["train"].texts) | set(s["validation"].texts))
            found = overlap(name, text.input_digests(s["train"]), text.input_digests(s["validation"]))
            leaks = variant == "overlap" and name in heldout_tasks.OVERLAPPING
            assert found.in_train == (30 if leaks else 0), (variant, name)
    for name in made["clean"]:  # the same test split in both variants
        assert read_text_task(made["clean"][name], ["test"]).splits["test"] == \
            read_text_task(made["overlap"][name], ["test"]).splits["test"]
