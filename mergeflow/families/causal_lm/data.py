"""Causal-LM tasks as a user brings them: one JSON Lines file per split in a task directory.

Layout (`read_causal_task`, written by `save_causal_task`):

    <task>/train.jsonl        fine-tuning (only read when an expert is trained here)
    <task>/validation.jsonl   sweeps, `method: auto`, statistics, registration choices
    <task>/test.jsonl         the reported scores
                              (a run reads the splits it needs; at least one must exist)

Every line is one JSON object, one example; blank lines are skipped and other keys (ids, sources) are ignored.
The keys decide the task's kind, which every line of every split must share:

    multiple choice   {"question": "...", "choices": ["...", "..."], "answer": 1}
                      `answer`: the index of the correct choice (0-based), or the correct choice's text; scored
                      by the log-likelihood of " " + choice after the question (`scoring`)
    perplexity        {"text": "..."}   scored by the token-level perplexity of the text
    short answer      {"question": "...", "answer": "..."}   scored by exact match of greedy generation

Errors name the file and the line (1-based) at fault.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

from mergeflow.errors import ConfigError

SPLIT_NAMES = ("train", "validation", "test")
Kind = Literal["multiple_choice", "perplexity", "exact_match"]
LAYOUT = ("train/validation/test.jsonl, one JSON object per line: {question, choices, answer} (multiple choice), "
          "{text} (perplexity) or {question, answer} (short answer, exact match)")


@dataclass(frozen=True)
class ChoiceSplit:
    questions: list[str]
    choices: list[tuple[str, ...]]
    answers: list[int]  # index into the example's choices
    kind: ClassVar[Kind] = "multiple_choice"


@dataclass(frozen=True)
class TextSplit:
    texts: list[str]
    kind: ClassVar[Kind] = "perplexity"


@dataclass(frozen=True)
class AnswerSplit:
    questions: list[str]
    answers: list[str]
    kind: ClassVar[Kind] = "exact_match"


CausalSplit = Union[ChoiceSplit, TextSplit, AnswerSplit]
SPLIT_TYPES: dict[str, type] = {cls.kind: cls for cls in (ChoiceSplit, TextSplit, AnswerSplit)}


def split_size(split: CausalSplit) -> int:
    return len(getattr(split, dataclasses.fields(split)[0].name))


def first(split: CausalSplit, count: int, start: int = 0) -> CausalSplit:
    """The split cut to its first `count` examples, less the first `start` of them."""
    return dataclasses.replace(split, **{f.name: getattr(split, f.name)[start:count]
                                         for f in dataclasses.fields(split)})


# ---------------------------------------------------------------------------------------------- reading


def kind_of(row: Mapping[str, Any]) -> Kind | None:
    if "choices" in row:
        return "multiple_choice"
    if "text" in row:
        return "perplexity"
    if "question" in row and "answer" in row:
        return "exact_match"
    return None


def _string(row: Mapping[str, Any], key: str, where: str, *, empty: bool = False) -> str:
    value = row.get(key)
    if not isinstance(value, str) or (not empty and not value.strip()):
        raise ConfigError(f"{where}: {key!r} must be a {'' if empty else 'non-empty '}string, not {value!r}")
    return value


def _choice_row(row: Mapping[str, Any], where: str) -> tuple[str, tuple[str, ...], int]:
    question = _string(row, "question", where, empty=True)
    choices = row.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise ConfigError(f"{where}: 'choices' must be a list of at least 2 non-empty strings, not {choices!r}")
    answer = row.get("answer")
    if isinstance(answer, str):
        if answer not in choices:
            raise ConfigError(f"{where}: 'answer' {answer!r} is none of the choices {choices!r}")
        answer = choices.index(answer)
    elif isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ConfigError(f"{where}: 'answer' must be a choice index 0..{len(choices) - 1} or the text of a choice, "
                          f"not {answer!r}")
    return question, tuple(choices), answer


def read_split(path: Path, kind: Kind | None = None, label: str | None = None) -> CausalSplit:
    """One split file; ConfigError naming the file (as `label`, default its path) and the line of the first bad
    example (or of one whose kind differs from `kind`, or from the file's first example)."""
    label = label or str(path)
    columns: dict[str, list[Any]] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{label}: not UTF-8 text: {exc}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{label}:{number}"
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"{where}: not a JSON object: {exc}") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: not a JSON object but {type(row).__name__}")
        found = kind_of(row)
        if found is None:
            raise ConfigError(f"{where}: keys {sorted(row)} fit no task kind (expected {LAYOUT})")
        if kind is None:
            kind = found
        elif found != kind:
            raise ConfigError(f"{where}: a {found} example in a {kind} task (every line of every split must be "
                              "of one kind)")
        if kind == "multiple_choice":
            values: tuple[Any, ...] = _choice_row(row, where)
            names: tuple[str, ...] = ("questions", "choices", "answers")
        elif kind == "perplexity":
            values, names = (_string(row, "text", where),), ("texts",)
        else:
            values = (_string(row, "question", where, empty=True), _string(row, "answer", where))
            names = ("questions", "answers")
        for name, value in zip(names, values, strict=True):
            columns.setdefault(name, []).append(value)
    if kind is None:
        raise ConfigError(f"{label}: no examples")
    return SPLIT_TYPES[kind](**columns)


def read_causal_task(directory: Path, splits: Sequence[str] | None = None, *, relative: bool = False
                     ) -> tuple[Kind, dict[str, CausalSplit]]:
    """(kind, split name -> split) of the task at `directory` (layout in the module docstring): the `splits` asked
    for; None: every split file present; []: none returned, but every present file is read and checked. Errors
    name files by path, or with `relative` by name in the directory (where the caller names the directory)."""
    directory = Path(directory)
    where = "the task directory" if relative else str(directory)
    present = [name for name in SPLIT_NAMES if (directory / f"{name}.jsonl").is_file()]
    if not present:
        raise ConfigError(f"{where}: no split file ({', '.join(f'{s}.jsonl' for s in SPLIT_NAMES)}); "
                          f"expected {LAYOUT}")
    wanted = present if splits is None or not splits else list(splits)
    unknown = [name for name in wanted if name not in SPLIT_NAMES]
    if unknown:
        raise ConfigError(f"{where}: unknown split {unknown[0]!r} (splits: {', '.join(SPLIT_NAMES)})")
    absent = [name for name in wanted if name not in present]
    if absent:
        raise ConfigError(f"{where}: no {absent[0]}.jsonl (present: {', '.join(f'{s}.jsonl' for s in present)})")
    kind: Kind | None = None
    result = {}
    for name in wanted:
        path = directory / f"{name}.jsonl"
        result[name] = read_split(path, kind, path.name if relative else None)
        kind = result[name].kind
    assert kind is not None
    return kind, ({} if splits is not None and not splits else result)


# ---------------------------------------------------------------------------------------------- writing


def split_rows(split: CausalSplit) -> list[dict[str, Any]]:
    """The split's examples as the JSON objects of its file."""
    if isinstance(split, ChoiceSplit):
        return [{"question": q, "choices": list(c), "answer": a}
                for q, c, a in zip(split.questions, split.choices, split.answers, strict=True)]
    if isinstance(split, TextSplit):
        return [{"text": text} for text in split.texts]
    return [{"question": q, "answer": a} for q, a in zip(split.questions, split.answers, strict=True)]


def save_causal_task(splits: Mapping[str, CausalSplit], directory: Path) -> None:
    """Write one `<split>.jsonl` per split (names in SPLIT_NAMES, one kind) in the layout `read_causal_task` reads."""
    kinds = {split.kind for split in splits.values()}
    if len(kinds) != 1 or not set(splits) <= set(SPLIT_NAMES):
        raise ConfigError(f"{directory}: splits must be among {', '.join(SPLIT_NAMES)} and of one kind "
                          f"(got {sorted(splits)}, kinds {sorted(kinds)})")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, split in splits.items():
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in split_rows(split))
        partial = directory / f".{name}.jsonl.partial"
        partial.write_text(text, encoding="utf-8")
        partial.replace(directory / f"{name}.jsonl")
