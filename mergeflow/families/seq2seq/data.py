"""Seq2seq (rank-classification) tasks kept in an object store or a local folder.

Layout (`read_seq2seq_task`, written by `save_seq2seq_task`), any fsspec URI or local path:

    <uri>/task.json         {"name": ..., "template": "sst2 sentence: {sentence}", "label_words": [...],
                             "metric": "accuracy" | "matthews" | "spearman", "values": [...] (regression only)}
                            For a GLUE task name (`GLUE_TASKS`) every other key may be left out and takes the GLUE
                            default; other tasks need template, label_words and metric. Without "name", the last
                            path component is the name.
    <uri>/{split}.parquet   one string column per template field and `label`: the integer class id (index into
                            label_words), or for a regression (values given) the target number; split in SPLIT_NAMES

Texts are the template filled in with each row's fields.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mergeflow.families.seq2seq.scoring import GLUE_TASKS, GlueTask
from mergeflow.errors import ConfigError, InputError, ObjectNotFoundError
from mergeflow.storage import filesystem, join, read_bytes, storage_error, write_files

SPLIT_NAMES = ("train", "validation", "test")
TASK_FILE = "task.json"
_KEYS = ("name", "template", "label_words", "metric", "values")


@dataclass(frozen=True)
class Seq2SeqSplit:
    texts: list[str]  # model inputs: the template filled in with each row's fields
    labels: list[Any]  # int class ids, or float targets of a regression


@dataclass(frozen=True)
class Seq2SeqTask:
    name: str
    task: GlueTask
    splits: dict[str, Seq2SeqSplit]


# ---------------------------------------------------------------------------------------------- task.json


def _string_list(raw: Any, key: str, source: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not raw or not all(isinstance(word, str) and word for word in raw):
        raise InputError(f"{source}: {key!r} must be a non-empty JSON array of non-empty strings")
    return tuple(raw)


def _number_list(raw: Any, source: str) -> tuple[float, ...]:
    if not isinstance(raw, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw):
        raise InputError(f"{source}: 'values' must be a JSON array of numbers")
    return tuple(float(v) for v in raw)


def _parse_task_json(raw: Any, source: str, default_name: str) -> GlueTask:
    """The GlueTask a task.json describes (GLUE defaults filling in absent keys); InputError naming `source`."""
    if not isinstance(raw, dict):
        raise InputError(f"{source}: must be a JSON object with keys {', '.join(_KEYS)}")
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise InputError(f"{source}: unknown keys {unknown} (known: {', '.join(_KEYS)})")
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise InputError(f"{source}: 'name' must be a non-empty string")
    defaults = GLUE_TASKS.get(name)
    if defaults is None:
        absent = [key for key in ("template", "label_words", "metric") if key not in raw]
        if absent:
            raise InputError(f"{source}: {name!r} is not a GLUE task ({', '.join(sorted(GLUE_TASKS))}), so it needs "
                             f"{', '.join(repr(k) for k in absent)}")
    template = raw.get("template", defaults.template if defaults else None)
    if not isinstance(template, str) or not template:
        raise InputError(f"{source}: 'template' must be a non-empty string")
    words = _string_list(raw["label_words"], "label_words", source) if "label_words" in raw else defaults.label_words
    metric = raw.get("metric", defaults.metric if defaults else None)
    if metric not in ("accuracy", "matthews", "spearman"):
        raise InputError(f"{source}: 'metric' must be 'accuracy', 'matthews' or 'spearman', not {metric!r}")
    if "values" in raw:
        values = None if raw["values"] is None else _number_list(raw["values"], source)
    else:
        values = defaults.values if defaults and metric == "spearman" else None
    try:
        task = GlueTask(name=name, template=template, label_words=words, metric=metric, values=values)
        task.fields  # noqa: B018 - a malformed template fails here
    except (ConfigError, ValueError) as exc:
        raise InputError(f"{source}: {exc}") from None
    if not task.fields:
        raise InputError(f"{source}: template {template!r} has no {{field}}")
    return task


def _task_json(name: str, task: GlueTask) -> dict[str, Any]:
    """The task.json object of `task` under `name` (every key written)."""
    raw: dict[str, Any] = {"name": name, "template": task.template, "label_words": list(task.label_words),
                           "metric": task.metric}
    if task.values is not None:
        raw["values"] = list(task.values)
    return raw


# ---------------------------------------------------------------------------------------------- splits


def _check_labels(task: GlueTask, labels: Sequence[Any], source: str) -> None:
    """InputError naming `source` and the row of the first label that is null, not a class id in range
    (classification), or not a finite number (regression)."""
    classes = len(task.label_words)
    for row, label in enumerate(labels):
        if task.values is None:
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < classes:
                raise InputError(f"{source}: column 'label', row {row}: {label!r} is not a class id "
                                 f"0..{classes - 1} (label_words of task {task.name!r})")
        elif isinstance(label, bool) or not isinstance(label, (int, float)) or not math.isfinite(label):
            raise InputError(f"{source}: column 'label', row {row}: {label!r} is not a finite number")


def _read_split(source: str, task: GlueTask, storage_options: Mapping[str, Any] | None) -> Seq2SeqSplit:
    try:
        table = pq.read_table(io.BytesIO(read_bytes(source, storage_options)))
    except pa.ArrowInvalid as exc:
        raise InputError(f"{source}: not a parquet file: {exc}") from None
    for column in (*task.fields, "label"):
        if column not in table.column_names:
            raise InputError(f"{source}: no column {column!r} (the template {task.template!r} needs "
                             f"{', '.join(task.fields)} and a label; columns: {', '.join(table.column_names)})")
    for field in task.fields:
        kind = table.column(field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise InputError(f"{source}: column {field!r} must hold strings, not {kind}")
    label_type = table.column("label").type
    if task.values is None and not pa.types.is_integer(label_type):
        raise InputError(f"{source}: column 'label' must be integer class ids for classification task "
                         f"{task.name!r}, not {label_type}")
    if task.values is not None and not (pa.types.is_integer(label_type) or pa.types.is_floating(label_type)):
        raise InputError(f"{source}: column 'label' must be numbers for regression task {task.name!r}, "
                         f"not {label_type}")
    labels = table.column("label").to_pylist()
    _check_labels(task, labels, source)
    if task.values is not None:
        labels = [float(label) for label in labels]
    columns = {field: table.column(field).to_pylist() for field in task.fields}
    texts = []
    for row in range(table.num_rows):
        example = {field: values[row] for field, values in columns.items()}
        empty = [field for field, value in example.items() if value is None]
        if empty:
            raise InputError(f"{source}: column {empty[0]!r} is null in row {row}")
        texts.append(task.format(example))
    return Seq2SeqSplit(texts=texts, labels=labels)


def read_seq2seq_task(uri: str, *, splits: Sequence[str] | None = None,
                      storage_options: Mapping[str, Any] | None = None) -> Seq2SeqTask:
    """Read the task at `uri` (layout in the module docstring): the given `splits`, or every split in SPLIT_NAMES
    that exists."""
    source = join(uri, TASK_FILE)
    try:
        raw = json.loads(read_bytes(source, storage_options))
    except ValueError as exc:
        raise InputError(f"{source}: not valid JSON: {exc}") from None
    task = _parse_task_json(raw, source, uri.rstrip("/").rsplit("/", 1)[-1])
    fs, root = filesystem(uri, storage_options)
    if splits is None:
        try:
            splits = [s for s in SPLIT_NAMES if fs.exists(f"{root.rstrip('/')}/{s}.parquet")]
        except Exception as exc:  # noqa: BLE001 - classified into input vs transient errors
            raise storage_error(uri, exc, "listing the splits") from exc
        if not splits:
            raise ObjectNotFoundError(f"{uri}: no split file ({', '.join(f'{s}.parquet' for s in SPLIT_NAMES)})")
    result = {split: _read_split(join(uri, f"{split}.parquet"), task, storage_options) for split in splits}
    return Seq2SeqTask(name=task.name, task=task, splits=result)


def _split_table(task: GlueTask, rows: Sequence[Mapping[str, Any]], labels: Sequence[Any], source: str) -> pa.Table:
    if len(rows) != len(labels):
        raise InputError(f"{source}: {len(rows)} rows but {len(labels)} labels")
    columns: dict[str, list[str]] = {field: [] for field in task.fields}
    for index, row in enumerate(rows):
        for field in task.fields:
            if field not in row or not isinstance(row[field], str):
                raise InputError(f"{source}: row {index} has no string field {field!r} (template {task.template!r})")
            columns[field].append(row[field])
    labels = list(labels)
    _check_labels(task, labels, source)
    label_array = pa.array(labels, pa.int64()) if task.values is None else pa.array(labels, pa.float64())
    return pa.table({**{field: pa.array(values, pa.string()) for field, values in columns.items()},
                     "label": label_array})


def save_seq2seq_task(name: str, task: GlueTask, rows_by_split: Mapping[str, Sequence[Mapping[str, Any]]],
                      labels_by_split: Mapping[str, Sequence[Any]], uri: str,
                      storage_options: Mapping[str, Any] | None = None) -> None:
    """Write task.json (`task` under `name`, every key) and one parquet file per split (in SPLIT_NAMES) with the
    template's fields of each row and its label, in the layout `read_seq2seq_task` reads."""
    unknown = sorted(set(rows_by_split) - set(SPLIT_NAMES))
    if unknown or set(rows_by_split) != set(labels_by_split):
        raise InputError(f"{uri}: splits must be among {', '.join(SPLIT_NAMES)} and the same for rows and labels "
                         f"(rows: {sorted(rows_by_split)}, labels: {sorted(labels_by_split)})")
    files = {TASK_FILE: json.dumps(_task_json(name, task), indent=2).encode()}
    for split, rows in rows_by_split.items():
        table = _split_table(task, rows, labels_by_split[split], join(uri, f"{split}.parquet"))
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        files[f"{split}.parquet"] = buffer.getvalue()
    write_files(uri, files, storage_options, what="the seq2seq task")
