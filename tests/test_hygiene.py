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
    assert found == Overlap("t", 3, 2)
    pixels = np.zeros((4, 4, 3), dtype=np.uint8)
    images = ImageSplit([Image.fromarray(pixels), Image.fromarray(pixels + 1)], [0, 1])
    assert overlap("i", get_family("hf_clip").input_digests(ImageSplit(images.images[:1], [0])),
                   get_family("hf_clip").input_digests(images)).in_train == 1


def test_the_warning_names_each_overlapping_task_and_its_count():
    assert overlap_warning([Overlap("a", 10, 0)]) is None
    line = overlap_warning({"a": {"validation": 10, "in_train": 0}, "b": {"validation": 8, "in_train": 2}})
    assert line.startswith("WARNING") and "b (2 of 8, 25%)" in line and "a (" not in line
