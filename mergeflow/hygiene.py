"""Data hygiene before a choice: validation examples that are also training examples (by input content) inflate
both the expert's and the merge's validation scores and bias every choice made on them (sweeps, `auto`, the model to
register). Found by content digest before any scoring, and reported naming the task and the count."""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


def input_digest(example: Any) -> str:
    """sha256 of one example's input: a text with its whitespace collapsed and case kept, or an image's pixels
    (mode, size and bytes of a PIL image; dtype, shape and bytes of an array or tensor)."""
    if isinstance(example, str):
        return hashlib.sha256(" ".join(example.split()).encode()).hexdigest()
    if hasattr(example, "tobytes") and hasattr(example, "mode"):  # PIL
        head = f"{example.mode}:{example.size}".encode()
        return hashlib.sha256(head + example.tobytes()).hexdigest()
    import numpy as np

    array = np.ascontiguousarray(example.numpy() if hasattr(example, "numpy") else np.asarray(example))
    return hashlib.sha256(f"{array.dtype}:{array.shape}".encode() + array.tobytes()).hexdigest()


@dataclass(frozen=True)
class Overlap:
    """How many of a task's validation examples also appear (by input content) in its training split."""

    task: str
    validation: int
    in_train: int
    positions: tuple[int, ...] = ()  # of those examples, in the validation split

    @property
    def share(self) -> float:
        return self.in_train / self.validation if self.validation else 0.0


def overlap(task: str, train: Sequence[str], validation: Sequence[str]) -> Overlap:
    """The `Overlap` of two splits' input digests."""
    seen = set(train)
    positions = tuple(i for i, d in enumerate(validation) if d in seen)
    return Overlap(task, len(validation), len(positions), positions)


def overlap_warning(found: Sequence[Overlap] | Mapping[str, Mapping[str, int]]) -> str | None:
    """One line naming every task whose validation split overlaps its training split (None: no overlap)."""
    rows = [o if isinstance(o, Overlap) else Overlap(t, o["validation"], o["in_train"])
            for t, o in (found.items() if isinstance(found, Mapping) else ((o.task, o) for o in found))]
    leaky = [o for o in rows if o.in_train]
    if not leaky:
        return None
    named = ", ".join(f"{o.task} ({o.in_train} of {o.validation}, {100 * o.share:.0f}%)" for o in leaky)
    return (f"WARNING: validation examples also in the training split: {named}. Scores on them are inflated for "
            "the experts and the merges alike, so choices made on validation (sweeps, auto, registration) lean "
            "toward what those examples favour; hold out validation examples the experts never trained on.")


MIN_HELD_OUT = 2  # a task with leaked validation examples votes once this many others are among those scored


def held_out(accuracy: Mapping[str, float], correct: Mapping[str, str], leaked: Mapping[str, Collection[int]]
             ) -> tuple[dict[str, float], dict[str, str]]:
    """A validation result (accuracy per task, each example's credit per task) read on the examples that are not
    training examples (`leaked`: their positions in each task's validation split): a task with leaked examples among
    those scored is scored on the others, and does not vote while fewer than `MIN_HELD_OUT` remain. Unchanged where
    nothing leaked, where the family gives no per-example credits, or where no task would be left to vote (then the
    overlap warning is all there is)."""
    out, credits_out = dict(accuracy), dict(correct)
    for task, found in leaked.items():
        credits, positions = credits_out.get(task), frozenset(found)
        if task not in out or not credits or not any(i < len(credits) for i in positions):
            continue
        kept = "".join(c for i, c in enumerate(credits) if i not in positions)
        if len(kept) < MIN_HELD_OUT:
            del out[task], credits_out[task]
        else:
            out[task], credits_out[task] = kept.count("1") / len(kept), kept
    return (out, credits_out) if out else (dict(accuracy), dict(correct))


def leaked_positions(found: Mapping[str, Mapping[str, Any]]) -> dict[str, list[int]]:
    """Per task, the positions of its leaked validation examples, from the overlap check's result."""
    return {task: list(o["positions"]) for task, o in found.items() if o.get("positions")}


def held_out_accuracy(record: Mapping[str, Any], leaked: Mapping[str, Collection[int]]) -> dict[str, float]:
    """A sweep point's validation accuracy per task ({"accuracy", "correct"}) read by `held_out`."""
    return held_out(record["accuracy"], record.get("correct") or {}, leaked)[0]


def held_out_note(found: Mapping[str, Mapping[str, Any]], examples: int) -> str | None:
    """One line saying how a choice on the first `examples` validation examples per task reads those that are
    training examples (`found`: the overlap check's {"validation", "positions"} per task): each task named with the
    examples it is scored on, or that it does not vote (None: nothing leaked among them)."""
    rows = []
    for task, o in sorted(found.items()):
        scored = min(examples, o["validation"])
        inside = sum(i < scored for i in o.get("positions", ()))
        if inside:
            left = scored - inside
            rows.append(f"{task} on {left} of its first {scored}" if left >= MIN_HELD_OUT
                        else f"{task} does not vote ({inside} of its first {scored} are training examples)")
    if not rows:
        return None
    return ("choice on validation examples the experts did not train on: " + "; ".join(rows) +
            " (if no task is left to vote, every example counts)")
