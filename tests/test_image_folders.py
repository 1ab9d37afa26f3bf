"""Image tasks stored as image-folder trees, `<uri>/<split>/<class name>/<image file>`, read by `read_image_task`
(real images: scikit-learn's digits written as PNG files)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from mergeflow.families.clip.data import (
    DIGIT_CLASSES,
    EncodedImages,
    ImageSplitSizes,
    ImageTask,
    load_digits_task,
    read_image_task,
    save_image_task,
)
from mergeflow.errors import InputError, ObjectNotFoundError


@pytest.fixture(scope="module")
def digits() -> ImageTask:
    return load_digits_task(seed=0, sizes=ImageSplitSizes(train=60, validation=20, test=40))


def _write_tree(task: ImageTask, root: Path) -> dict[str, list[tuple[int, str, bytes]]]:
    """Write every image as `<split>/<class>/<index>.png`; per split, (label, file name, RGB pixels) in the order
    the reader returns them: by class, then file name."""
    expected = {}
    for split_name, split in task.splits.items():
        rows = []
        for i, (image, label) in enumerate(zip(split.images, split.labels)):
            target = root / split_name / task.class_names[label] / f"{i}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            image.save(target)
            rows.append((label, target.name, np.asarray(image).tobytes()))
        expected[split_name] = sorted(rows, key=lambda row: (row[0], row[1]))
    return expected


def _png(value: int, size: tuple[int, int] = (12, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _put(root: Path, relative: str, payload: bytes) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)


def test_a_digits_folder_tree_reads_through_a_path_and_a_file_uri(digits: ImageTask, tmp_path: Path) -> None:
    root = tmp_path / "digit-folders"
    expected = _write_tree(digits, root)
    for uri in (str(root), f"file://{root}"):
        task = read_image_task(uri)
        assert task.name == "digit-folders" and task.class_names == DIGIT_CLASSES
        assert sorted(task.splits) == ["test", "train", "validation"]
        for split_name, rows in expected.items():
            split = task.splits[split_name]
            assert isinstance(split.images, EncodedImages)  # held as encoded bytes, decoded on access
            assert split.labels == [label for label, _, _ in rows]
            assert [np.asarray(image).tobytes() for image in split.images] == [pixels for _, _, pixels in rows]
            assert split.images[0].mode == "RGB" and split.images[0].size == (32, 32)
            assert split.images.names[0] == f"{uri}/{split_name}/{digits.class_names[rows[0][0]]}/{rows[0][1]}"

    only_test = read_image_task(str(root), splits=["test"], name="digits")
    assert only_test.name == "digits" and list(only_test.splits) == ["test"]
    assert only_test.splits["test"].labels == [label for label, _, _ in expected["test"]]
    with pytest.raises(ObjectNotFoundError, match=r"digit-folders/nope: no such split folder"):
        read_image_task(str(root), splits=["nope"])


def test_class_names_are_the_sorted_folders_across_splits_or_classes_json(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    _put(root, "train/dog/a.png", _png(10))
    _put(root, "train/cat/b.JPG", _png(20))  # any case of a known suffix; the bytes decide the format
    _put(root, "train/bird/c.webp", _png(30))
    _put(root, "test/dog/d.png", _png(40))
    _put(root, "test/.DS_Store", b"junk")  # hidden names are skipped
    _put(root, "test/bird/.thumbnails/x.txt", b"junk")
    task = read_image_task(str(root), splits=["test"])
    assert task.class_names == ["bird", "cat", "dog"]  # "cat" only has training images
    assert task.splits["test"].labels == [2]
    train = read_image_task(str(root)).splits["train"]
    assert train.labels == [0, 1, 2] and [np.asarray(i)[0, 0, 0] for i in train.images] == [30, 20, 10]

    (root / "classes.json").write_text(json.dumps(["dog", "cat", "bird", "fish"]))
    task = read_image_task(str(root))
    assert task.class_names == ["dog", "cat", "bird", "fish"]
    assert task.splits["train"].labels == [0, 1, 2] and task.splits["test"].labels == [0]
    assert [np.asarray(i)[0, 0, 0] for i in task.splits["train"].images] == [10, 20, 30]

    _put(root, "validation/horse/e.png", _png(50))
    with pytest.raises(InputError, match=r"pets/validation/horse: class folder 'horse' is not in .*classes.json"):
        read_image_task(str(root))


def test_errors_name_the_file_at_fault(tmp_path: Path) -> None:
    root = tmp_path / "broken"
    _put(root, "test/a/good.png", _png(1))
    _put(root, "test/a/bad.png", b"not an image")
    images = read_image_task(str(root)).splits["test"].images
    assert np.asarray(images[1])[0, 0, 0] == 1  # good.png sorts after bad.png
    with pytest.raises(InputError, match=r"broken/test/a/bad.png is not a readable image"):
        images[0]

    _put(root, "test/a/notes.txt", b"text")
    with pytest.raises(InputError, match=r"broken/test/a/notes.txt: not an image file \(expected .png"):
        read_image_task(str(root))
    (root / "test/a/notes.txt").unlink()
    _put(root, "test/stray.png", _png(2))
    with pytest.raises(InputError, match=r"broken/test/stray.png: a file directly in the split folder"):
        read_image_task(str(root))
    (root / "test/stray.png").unlink()
    _put(root, "test/a/deeper/c.png", _png(3))
    with pytest.raises(InputError, match=r"broken/test/a/deeper: nested folders are not read"):
        read_image_task(str(root))

    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    with pytest.raises(InputError, match=r"empty/train: no image files"):
        read_image_task(str(empty))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ObjectNotFoundError, match=r"nothing: no image task.*train.parquet.*<class name>"):
        read_image_task(str(tmp_path / "nothing"))


def test_parquet_files_take_precedence_and_any_fsspec_store_works(digits: ImageTask, tmp_path: Path) -> None:
    root = tmp_path / "both"
    _write_tree(digits, root)
    small = ImageTask("digits", ["x"] * 10, {"test": digits.splits["test"]})
    save_image_task(small, str(root))
    assert read_image_task(str(root)).class_names == ["x"] * 10  # the parquet layout, with its classes.json

    fs = fsspec.filesystem("memory")  # an object store: folders exist only as key prefixes
    fs.pipe({"/mergeflow-folders/task/train/b/1.png": _png(7), "/mergeflow-folders/task/train/a/2.png": _png(8)})
    task = read_image_task("memory://mergeflow-folders/task")
    assert task.class_names == ["a", "b"] and task.splits["train"].labels == [0, 1]
    assert np.asarray(task.splits["train"].images[1])[0, 0, 0] == 7
