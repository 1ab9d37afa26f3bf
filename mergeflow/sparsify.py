"""Sparsification of task vectors: top-k magnitude masks (per tensor, and global over many tensors by an exact
streaming radix select) and DARE random drop masks.

Keep rule (the TIES/DOGE reference rule): with d values and density k, the threshold is the
(d - floor(k*d))-th smallest |value| and the mask keeps |value| >= threshold, i.e. floor(k*d)+1 entries
(more on ties). Density 1 keeps everything.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from mergeflow.progress import progress_bar

from mergeflow.parallel import parallel_map
from mergeflow.task_vectors import ExpertPool

_HIGH_BINS = 1 << 15  # |x| has sign bit 0, so the top 16 bits of its float32 pattern take 2**15 values
_LOW_BINS = 1 << 16


def _kth_rank(count: int, density: float) -> int:
    """1-based rank of the threshold among the sorted |values|; 0 means keep everything."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return count - int(count * density)


def topk_threshold(values: torch.Tensor, density: float) -> float:
    """Dense reference: the magnitude threshold of the top-`density` fraction of `values`."""
    flat = values.detach().reshape(-1).float().abs()
    k = _kth_rank(flat.numel(), density)
    return 0.0 if k <= 0 else float(flat.kthvalue(k).values)


def global_topk_thresholds(pool: ExpertPool, density: float, keys: Sequence[str] | None = None,
                           *, progress: bool = False) -> list[float]:
    """Per-task magnitude thresholds of the top-`density` fraction over all `keys` (default: every float tensor),
    exactly equal to `topk_threshold` on the concatenated task vector, in two streaming passes (a thread per task).

    The float32 bit pattern of a non-negative number orders like the number, so the k-th smallest |value| is
    found by a histogram of the high 16 bits (which bin holds rank k) and then one of the low 16 bits inside
    that bin (little-endian: the odd and even int16 halves of the fp32 pattern). Memory: two small histograms
    per task, whatever the model size.
    """
    keys = list(pool.float_keys() if keys is None else keys)
    n = len(pool.experts)
    total = 0
    for name in keys:
        numel = 1
        for dim in pool.base.info(name).shape:
            numel *= dim
        total += numel
    k = _kth_rank(total, density)
    if k <= 0 or total == 0:
        return [0.0] * n

    def high_counts(row: torch.Tensor) -> torch.Tensor:  # the top 16 bits of |x|: the odd int16 halves, sign off
        return torch.bincount(row.view(torch.int16)[1::2] & 0x7FFF, minlength=_HIGH_BINS)

    high = torch.zeros((n, _HIGH_BINS), dtype=torch.int64, device=pool.device)
    for _, _, _, tv in progress_bar(pool.blocks(keys), total=len(pool.plan_blocks(keys)), desc="top-k pass 1/2",
                                    disable=not progress):
        high += torch.stack(parallel_map(high_counts, tv.reshape(n, -1)))
    cumulative = high.cumsum(1)
    target = torch.full((n, 1), k, dtype=torch.int64, device=pool.device)
    bin_high = torch.searchsorted(cumulative, target).squeeze(1)  # first bin whose cumulative count reaches k
    below = torch.where(bin_high > 0, cumulative.gather(1, (bin_high - 1).clamp(min=0).unsqueeze(1)).squeeze(1), 0)
    k_low = (k - below).unsqueeze(1)
    wanted = bin_high.tolist()

    def low_counts(task: tuple[int, torch.Tensor]) -> torch.Tensor:  # low 16 bits of the entries in the found bin
        i, row = task
        halves = row.view(torch.int16)
        inside = (halves[1::2] & 0x7FFF) == wanted[i]
        return torch.bincount(halves[0::2][inside].to(torch.int32) & 0xFFFF, minlength=_LOW_BINS)

    low = torch.zeros((n, _LOW_BINS), dtype=torch.int64, device=pool.device)
    for _, _, _, tv in progress_bar(pool.blocks(keys), total=len(pool.plan_blocks(keys)), desc="top-k pass 2/2",
                                    disable=not progress):
        low += torch.stack(parallel_map(low_counts, enumerate(tv.reshape(n, -1))))
    bin_low = torch.searchsorted(low.cumsum(1), k_low).squeeze(1)
    pattern = ((bin_high << 16) | bin_low).to(torch.int32)
    return pattern.view(torch.float32).tolist()


def seeded_generator(seed: int, *context: object) -> torch.Generator:
    """A CPU generator seeded from `seed` and a context (task index, tensor name): independent of order."""
    digest = hashlib.sha256(repr((seed, *context)).encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


_DARE_BLOCK = 1 << 18  # DARE's masks are drawn per block of this many coordinates of the flattened tensor


def _uniform16(count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` independent uniform 16-bit draws, as int16 shifted by -32768 (so they order like the draws): three
    from the low 48 bits of each random int64 (its top bit is always 0), a quarter of the generator calls of
    one float per coordinate."""
    draws = torch.empty(-(-count // 3), dtype=torch.int64).random_(generator=generator)
    return (draws.view(torch.int16).reshape(-1, 4)[:, :3].reshape(-1)[:count]) ^ -32768


def dare_keep_mask(shape: Sequence[int], drop_rate: float, seed: int, task_index: int, name: str,
                   offset: int = 0) -> torch.Tensor:
    """DARE: keep each entry with probability 1 - drop_rate (drop_rate taken to the nearest 1/65536; on CPU, so
    every device gets the same mask), for the coordinates [offset, offset + prod(shape)) of the flattened tensor
    `name`. Each block of `_DARE_BLOCK` coordinates has a generator of its own, so a block of rows gets the same
    mask as it has in the whole tensor."""
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop rate must be in [0, 1), got {drop_rate}")
    threshold = round(drop_rate * 65536) - 32768  # keep a draw u (0..65535) when u >= drop_rate * 65536
    count = 1
    for dim in shape:
        count *= dim
    return (seeded_draws(count, seed, task_index, name, offset) >= threshold).reshape(tuple(shape))


def seeded_draws(count: int, seed: int, task_index: int, name: str, offset: int = 0) -> torch.Tensor:
    """The uniform 16-bit draws (int16, shifted by -32768) of coordinates [offset, offset + count) of tensor `name`
    for one task: one generator per block of `_DARE_BLOCK` coordinates, so a block of rows draws what it draws in
    the whole tensor. DARE keeps an entry when its draw is >= round(p_drop * 65536) - 32768."""
    parts, position, stop = [], offset, offset + count
    while position < stop:
        block = position // _DARE_BLOCK
        end = min(stop, (block + 1) * _DARE_BLOCK)
        draws = _uniform16(end - block * _DARE_BLOCK, seeded_generator(seed, task_index, name, block))
        parts.append(draws[position - block * _DARE_BLOCK:])
        position = end
    return torch.cat(parts) if len(parts) != 1 else parts[0]
