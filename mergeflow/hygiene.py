"""Data hygiene before a choice: validation examples that are also training examples (by input content) inflate
both the expert's and the merge's validation scores and bias every choice made on them (sweeps, `auto`, the model to
register). Found by content digest before any scoring, and reported naming the task and the count."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
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

    @property
    def share(self) -> float:
        return self.in_train / self.validation if self.validation else 0.0


def overlap(task: str, train: Sequence[str], validation: Sequence[str]) -> Overlap:
    """The `Overlap` of two splits' input digests."""
    seen = set(train)
    return Overlap(task, len(validation), sum(d in seen for d in validation))


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
