"""TIES-Merging (Yadav et al., 2023): trim each task vector to its top-k magnitudes (global over the model),
elect a sign per coordinate, and merge only the entries that agree with it.

Two variants, chosen by `merge`:
- "sum" with scaling 0.3, density 0.2: the vision-benchmark variant (AdaMerging and FusionBench code, behind the
  familiar 72.4 on ViT-B/32 TA8): theta_0 + 0.3 * disjoint SUM. This is the default.
- "mean" with scaling ~1: the paper's disjoint MEAN (average of the agreeing entries).
Elected sign: sign of the sum of trimmed vectors; coordinates where that sum is exactly 0 take the model-wide
majority sign (the reference resolution), which `prepare` computes in a streaming pass of its own and a whole
merge elects as it goes (`finish` then settles the coordinates that needed it).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from mergeflow.progress import progress_bar

from mergeflow.methods.base import BLOCK_OFFSET, RUN_ONLY, MergeMethod, MethodParams
from mergeflow.sparsify import global_topk_thresholds
from mergeflow.task_vectors import ExpertPool


class TiesParams(MethodParams):
    density: float = Field(0.2, gt=0.0, le=1.0,
                           description="fraction k of each task vector kept (largest |values| over the whole model)")
    scaling: float = Field(0.3, ge=0.0, le=10.0, description="lambda applied to the disjoint merge")
    merge: Literal["sum", "mean"] = Field(
        "sum", description="disjoint sum (vision-benchmark variant) or disjoint mean (the paper's)")


def _trim(task_vectors: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    """Zero the entries of each task below its threshold (whole tensors: the sign election's pass)."""
    shape = (len(thresholds),) + (1,) * (task_vectors.dim() - 1)
    limit = torch.tensor(thresholds, dtype=task_vectors.dtype, device=task_vectors.device).reshape(shape)
    return task_vectors.masked_fill(task_vectors.abs() < limit, 0.0)


class Ties(MergeMethod):
    name = "ties"
    summary = "Trim to top-k, elect signs, disjoint merge (data-free)."
    Params = TiesParams
    sweep_grid = {"density": [0.1, 0.2, 0.5], "scaling": [0.3, 0.5, 0.7, 1.0]}
    scaling_param = "scaling"
    prepare_params = ("density",)
    checks_inline = True
    elementwise = True

    def prepare(self, pool: ExpertPool, *, progress: bool = False) -> dict[str, Any]:
        """Thresholds and the model-wide majority sign (a pass of its own: what a merge split into parts needs)."""
        state = self.prepare_merge(pool, progress=progress)
        sign_total = 0
        keys = pool.float_keys()
        for _, _, _, tv in progress_bar(pool.blocks(keys), total=len(pool.plan_blocks(keys)), desc="sign election",
                                        disable=not progress):
            sign_total += int(torch.sign(_trim(tv, state["thresholds"]).sum(dim=0)).sum().item())
        return {**state, "majority_sign": (sign_total > 0) - (sign_total < 0)}

    def prepare_merge(self, pool: ExpertPool, *, progress: bool = False) -> dict[str, Any]:
        """Thresholds only: a whole merge elects the majority sign as it goes and settles the few coordinates that
        need it at the end (`finish`), a pass over the inputs fewer."""
        return {"thresholds": global_topk_thresholds(pool, self.params.density, progress=progress)}

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: torch.Tensor,
                     state: dict[str, Any]) -> torch.Tensor:
        n = len(task_vectors)
        limit = torch.tensor(state["thresholds"], dtype=torch.float32, device=base.device).reshape(n, 1)
        flat_tv, flat_base = task_vectors.reshape(n, -1), base.reshape(-1)
        merged = torch.empty_like(flat_base)
        electing = "majority_sign" not in state  # elected in this pass: take +, remember what - would give
        undecided = torch.zeros_like(flat_base, dtype=torch.bool) if electing else None
        alternative = torch.empty_like(flat_base) if electing else None
        for start in range(0, flat_base.numel(), _CHUNK):  # a chunk's temporaries stay in the CPU cache
            part = slice(start, start + _CHUNK)
            merged[part] = self._merge_chunk(flat_base[part], flat_tv[:, part], limit, state,
                                             None if undecided is None else undecided[part],
                                             None if alternative is None else alternative[part])
        if electing and bool(undecided.any()):  # one record per tensor or block: no heap of small pieces
            index = undecided.nonzero().squeeze(1)
            state.setdefault(_PENDING, []).append(
                (name, (index + state.get(BLOCK_OFFSET, 0)).cpu(), alternative[index].cpu()))
        return merged.reshape(base.shape)

    def _merge_chunk(self, base: torch.Tensor, task_vectors: torch.Tensor, limit: torch.Tensor,
                     state: dict[str, Any], undecided: torch.Tensor | None,
                     alternative: torch.Tensor | None) -> torch.Tensor:
        trimmed = task_vectors.masked_fill(task_vectors.abs() < limit, 0.0)
        sign = torch.sign(trimmed.sum(dim=0))
        positive, negative = trimmed.clamp(min=0).sum(dim=0), trimmed.clamp(max=0).sum(dim=0)
        if self.params.merge == "mean":
            positive /= (trimmed > 0).sum(dim=0).clamp(min=1)
            negative /= (trimmed < 0).sum(dim=0).clamp(min=1)
        cancelled = sign == 0  # the trimmed entries sum to exactly 0: the model-wide majority sign decides
        majority = state.get("majority_sign", 1)
        if undecided is not None:  # electing: sign total so far, and the coordinates a - majority would change
            state[_SIGN_TOTAL] = state.get(_SIGN_TOTAL, 0) + int(sign.sum(dtype=torch.int64))
            torch.logical_and(cancelled, negative != 0, out=undecided)
            alternative.copy_(base + self.params.scaling * negative)
        keep_positive = (sign > 0) | (cancelled & (majority > 0))
        return base + self.params.scaling * torch.where(keep_positive, positive, negative)

    def finish(self, state: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if _SIGN_TOTAL not in state:
            return {}
        total = state[_SIGN_TOTAL]
        state["majority_sign"] = (total > 0) - (total < 0)
        if state["majority_sign"] > 0:
            return {}
        corrections: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for name, index, values in state.get(_PENDING, []):
            corrections.setdefault(name, ([], []))[0].append(index)
            corrections[name][1].append(values)
        return {name: (torch.cat(index), torch.cat(values)) for name, (index, values) in corrections.items()}


_CHUNK = 1 << 15  # coordinates merged at a time
_SIGN_TOTAL = RUN_ONLY + "sign_total"  # run-only state of a merge that elects the majority sign as it goes
_PENDING = RUN_ONLY + "pending"  # [(tensor, flat indices, merged values if the majority is not +)]
