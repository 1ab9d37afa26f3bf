"""Warm starts of iterative solvers: the state a per-tensor optimisation ended in (WUDI's and DOGE TA's Adam steps,
MaTS's conjugate gradient, AdaMerging's coefficient fit), kept so that a run of the same problem with more steps
continues from it instead of starting over. `auto` scores an iterative candidate with a fraction of its steps at the
early rungs and with all of them at the last; with its early state kept, the last rung pays only the steps left.

Continuing is exact: a saved state holds everything the next step reads (the iterate, Adam's moments and step
count, CG's residual, direction and per-system flags, AdaMerging's losses and RNG state), so k steps and then
n - k more give the bits of n steps at once (tested per method). A state is looked up by the tensor (or same-shape
group) it solves, under a directory that the caller keys by the method, its parameters but the step count, and the
inputs' digests.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mergeflow.checkpoints.safetensors_format import save_safetensors

STEPS_FILE = "{steps:09d}.safetensors"


class WarmStarts:
    """Per-tensor solver states of one problem in the local directory `root`. `save` writes a run's end state (only
    when `keep`: a run that will be continued, e.g. an early rung's); `latest` reads the saved state with the most
    steps not above a run's own."""

    def __init__(self, root: str | Path, keep: bool = True):
        self.root, self.keep = Path(root), keep

    def _folder(self, names: Sequence[str]) -> Path:
        return self.root / hashlib.sha256("\n".join(names).encode()).hexdigest()[:24]

    def latest(self, names: Sequence[str], steps: int) -> tuple[int, dict[str, torch.Tensor]] | None:
        """(steps done, state) of the tensors `names` solved together, the saved state with the most steps <=
        `steps`; None when there is none."""
        from safetensors.torch import load_file

        folder = self._folder(names)
        done = sorted((int(p.stem) for p in folder.glob("*.safetensors") if p.stem.isdigit()), reverse=True) \
            if folder.is_dir() else []
        for saved in done:
            if saved <= steps:
                return saved, load_file(str(folder / STEPS_FILE.format(steps=saved)))
        return None

    def save(self, names: Sequence[str], steps: int, state: Mapping[str, torch.Tensor]) -> None:
        """Keep the state after `steps` (written whole or not at all; a state already kept stays)."""
        if not self.keep:
            return
        folder = self._folder(names)
        path = folder / STEPS_FILE.format(steps=steps)
        if path.exists():
            return
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
        try:
            save_safetensors({k: v.detach().contiguous() for k, v in state.items()}, partial)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)


@dataclass(frozen=True)
class Resume:
    """One solve's link to its kept states: the tensors `names` it solves, in `store`."""

    store: WarmStarts
    names: tuple[str, ...]

    @classmethod
    def of(cls, store: WarmStarts | None, names: Sequence[str]) -> Resume | None:
        """The link of a solve of `names` where the run keeps warm starts (`store`), else None: from scratch."""
        return None if store is None else cls(store, tuple(names))

    @property
    def keeps(self) -> bool:
        """Whether `end` keeps the state (the run will be continued), so that a solver gathers it only then."""
        return self.store.keep

    def start(self, steps: int) -> tuple[int, dict[str, torch.Tensor]] | None:
        """(steps done, state) to continue a run of `steps` from, or None: start from scratch."""
        return self.store.latest(self.names, steps)

    def end(self, steps: int, state: Mapping[str, torch.Tensor]) -> None:
        self.store.save(self.names, steps, state)


ADAM_KEYS = ("param", "exp_avg", "exp_avg_sq", "step")


def _adam_state(param: torch.Tensor, adam: torch.optim.Adam) -> dict[str, torch.Tensor]:
    """What the next Adam step on `param` reads: the iterate, both moments and the step count."""
    state = adam.state[param]
    return {"param": param.detach(), "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"],
            "step": torch.as_tensor(state["step"]).reshape(1)}


def restore_adam(param: torch.Tensor, adam: torch.optim.Adam, saved: Mapping[str, torch.Tensor]) -> None:
    """Put `param` and `adam` back in the state `_adam_state` read (on `param`'s device)."""
    device = param.device
    with torch.no_grad():
        param.copy_(saved["param"].to(device))
    adam.state[param] = {"step": saved["step"].reshape(()).to(device, torch.float32).clone(),  # Adam counts in place
                         "exp_avg": saved["exp_avg"].to(device).clone(),
                         "exp_avg_sq": saved["exp_avg_sq"].to(device).clone()}


def resume_adam(resume: Resume | None, param: torch.Tensor, adam: torch.optim.Adam, steps: int,
                extra: dict[str, torch.Tensor] | None = None) -> int:
    """Steps already done of an Adam run of `steps` on `param`: those of the kept state `resume` finds (restored into
    `param` and `adam`; what `keep_adam` kept beside them goes into `extra`), else 0."""
    found = resume.start(steps) if resume is not None else None
    if found is None:
        return 0
    restore_adam(param, adam, found[1])
    if extra is not None:
        extra.update({k: v for k, v in found[1].items() if k not in ADAM_KEYS})
    return found[0]


def keep_adam(resume: Resume | None, param: torch.Tensor, adam: torch.optim.Adam, steps: int, done: int,
              extra: Mapping[str, torch.Tensor] | None = None) -> None:
    """Keep the end state of an Adam run of `steps` that ran steps (`done` of them restored), with the run's own
    `extra` tensors (e.g. AdaMerging's losses and RNG state)."""
    if resume is not None and steps > done:
        resume.end(steps, {**_adam_state(param, adam), **(extra or {})})
