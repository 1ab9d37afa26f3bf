"""Validation examples that are also training examples, found by input content before any choice is scored."""

from __future__ import annotations

import numpy as np
from PIL import Image

from mergeflow.families import get_family
from mergeflow.families.clip.data import ImageSplit
from mergeflow.families.text.data import TextSplit
from mergeflow.hygiene import Overlap, input_digest, overlap, overlap_warning


def test_texts_match_by_content_with_whitespace_collapsed_and_case_kept():
    assert input_digest("a  good\nfilm ") == input_digest("a good film")
    assert input_digest("A good film") != input_digest("a good film")


def test_images_match_by_pixels():
    pixels = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    same, other = Image.fromarray(pixels), Image.fromarray(pixels[::-1].copy())
    assert input_digest(Image.fromarray(pixels)) == input_digest(same) != input_digest(other)
    assert input_digest(pixels) != input_digest(pixels.reshape(8, 2, 3))  # the shape counts


def test_families_digest_their_splits_and_overlaps_are_counted():
    train = TextSplit(["one", "two", "three"], [0, 1, 0])
    validation = TextSplit(["two", "four", " three"], [1, 1, 0])
    text = get_family("hf_text")
    found = overlap("t", text.input_digests(train), text.input_digests(validation))
    assert found == Overlap("t", 3, 2, (0, 2))
    pixels = np.zeros((4, 4, 3), dtype=np.uint8)
    images = ImageSplit([Image.fromarray(pixels), Image.fromarray(pixels + 1)], [0, 1])
    assert overlap("i", get_family("hf_clip").input_digests(ImageSplit(images.images[:1], [0])),
                   get_family("hf_clip").input_digests(images)).in_train == 1


def test_the_warning_names_each_overlapping_task_and_its_count():
    assert overlap_warning([Overlap("a", 10, 0)]) is None
    line = overlap_warning({"a": {"validation": 10, "in_train": 0}, "b": {"validation": 8, "in_train": 2}})
    assert line.startswith("WARNING") and "b (2 of 8, 25%)" in line and "a (" not in line


def test_a_result_is_read_on_the_validation_examples_the_experts_did_not_train_on():
    from mergeflow.hygiene import held_out, held_out_note

    accuracy, correct = {"a": 0.75, "b": 0.5, "c": 1.0}, {"a": "1101", "b": "10", "c": ""}
    read, credits = held_out(accuracy, correct, {"a": [0, 1], "b": [0, 9]})
    assert read == {"a": 0.5, "c": 1.0} and credits == {"a": "01", "c": ""}  # b keeps one example: no vote
    assert held_out(accuracy, correct, {"c": [0]}) == (accuracy, correct)  # no credits: nothing to hold out
    assert held_out({"a": 1.0}, {"a": "11"}, {"a": [0, 1]}) == ({"a": 1.0}, {"a": "11"})  # nobody left to vote
    assert held_out(accuracy, correct, {"a": [7]}) == (accuracy, correct)  # past the examples scored
    note = held_out_note({"a": {"validation": 9, "positions": [0, 1]}, "b": {"validation": 3, "positions": [0, 2]},
                          "c": {"validation": 5, "positions": []}}, 4)
    assert note.endswith("counts)") and "a on 2 of its first 4; b does not vote (2 of its first 3" in note
    assert held_out_note({"a": {"validation": 9, "positions": [5]}}, 4) is None


def test_auto_chooses_on_held_out_examples_where_validation_leaked():
    """Task a's first 10 validation examples are training examples: the candidate nearer the experts gets them
    all right (memorised) and half as many of the other 10; the search must choose the one better on those 10."""
    from mergeflow.search import Candidate, successive_halving

    near, far = Candidate("task_arithmetic", {"scaling": 1.0}), Candidate("task_arithmetic", {"scaling": 0.3})
    credits = {near.name: "1111111111" + "1111000000", far.name: "1110000000" + "1111111100"}

    def score(rung, examples, chosen):
        return [{"accuracy": {"a": credits[c.name].count("1") / 20, "b": 0.75},
                 "correct": {"a": credits[c.name], "b": "1" * 15 + "0" * 5}} for c in chosen]

    common = dict(min_examples=20, max_examples=20, extend_edges=False)
    assert successive_halving([near, far], score, {"a": 1.0, "b": 1.0}, **common).winner == near
    result = successive_halving([near, far], score, {"a": 1.0, "b": 1.0}, leaked={"a": range(10)}, **common)
    assert result.winner == far and result.winner_score.accuracy["a"] == 0.8


def test_a_run_can_choose_to_read_the_leaked_examples():
    from mergeflow.config import RunConfig
    from mergeflow.stages.stage import Context

    found = {"overlap": {"a": {"validation": 4, "in_train": 2, "positions": [0, 3]},
                         "b": {"validation": 4, "in_train": 0, "positions": []}}}
    body = {"name": "p", "model": {"pretrained": "all-MiniLM-L6-v2"}, "tasks": [{"name": "election"}],
            "merges": [{"method": "task_arithmetic", "sweep": {"scaling": [0.5, 1.0]}}]}
    held = Context(RunConfig.model_validate(body), None, "cpu", None, found)
    assert held.leaked() == {"a": [0, 3]} and held.held_out() == found["overlap"]
    read = Context(RunConfig.model_validate({**body, "tuning": {"leaked": "read"}}), None, "cpu", None, found)
    assert read.leaked() == {} and read.held_out() == {}


def test_choices_read_the_overlap_check():
    from mergeflow.config import RunConfig
    from mergeflow.plan import compile_plan

    config = RunConfig.model_validate({
        "name": "p", "model": {"pretrained": "all-MiniLM-L6-v2"}, "tasks": [{"name": "election"}],
        "merges": [{"method": "task_arithmetic", "sweep": {"scaling": [0.5, 1.0]}},
                   {"method": "auto", "search": {"methods": ["task_arithmetic"]}}]})
    plan = compile_plan(config)
    assert "overlap" in plan.node("select:task_arithmetic-tuned").inputs
    assert "overlap" in plan.node("chosen:auto").inputs
