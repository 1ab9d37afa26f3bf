"""Per-layer spectral building blocks of the subspace methods (TSV-M, Iso-C, Iso-CTS, DOGE): truncated singular
triplets, polar factors and the subspace sizes the reference code uses.

Singular triplets come from the eigendecomposition of the min(m, n)-sized Gram matrix in float64: exact to fp32
rounding (LAPACK's fp32 thin SVD loses ~1e-4 on the trailing vectors of a gapless spectrum) and about 2x faster
at ViT sizes. Where a kept singular value is numerically zero (a rank-deficient layer), the null-space vectors
are arbitrary in every implementation; there the fp32 SVD is used, as the reference code does.
"""

from __future__ import annotations

import torch

_RANK_TOLERANCE = 1e-12  # an eigenvalue of the Gram below this fraction of the largest counts as zero


def top_singular(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-`k` singular triplets (u [m, k], s [k], vh [k, n]) of `matrix` [m, n], fp32, s descending."""
    m, n = matrix.shape
    k = min(k, m, n)
    a = matrix.double()
    small = min(m, n)
    values, vectors = torch.linalg.eigh(a @ a.mT if m <= n else a.mT @ a)
    values, vectors = values[small - k:].flip(-1), vectors[:, small - k:].flip(-1)
    if k and values[-1] <= _RANK_TOLERANCE * values[0].clamp(min=torch.finfo(torch.float64).tiny):
        u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
        return u[:, :k].contiguous(), s[:k].contiguous(), vh[:k].contiguous()
    s = values.sqrt()
    if m <= n:
        return vectors.float(), s.float(), (vectors.mT @ a / s[:, None]).float()
    return (a @ vectors / s).float(), s.float(), vectors.mT.float().contiguous()


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P of `matrix` [m, n] (= U V^T of its thin SVD; the closest matrix with
    orthonormal columns, or rows when m < n). Falls back to the fp32 SVD when the matrix is rank-deficient, where
    the factor is not unique."""
    m, n = matrix.shape
    a = matrix.double()
    tall = m >= n
    values, vectors = torch.linalg.eigh(a.mT @ a if tall else a @ a.mT)
    if values[0] <= _RANK_TOLERANCE * values[-1].clamp(min=torch.finfo(torch.float64).tiny):
        u, _, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
        return u @ vh
    inverse_root = (vectors / values.sqrt()) @ vectors.mT
    return (a @ inverse_root if tall else inverse_root @ a).float()


def tsv_rank(r: int, tasks: int) -> int:
    """Triplets kept per task by TSV-M (and DOGE's per-task basis): int(r * (1 / T)), as the reference computes
    it (r // T for every practical size)."""
    return int(r * (1 / tasks))


def iso_cts_sizes(r: int, tasks: int, common_fraction: float) -> tuple[int, int]:
    """(common size c, per-task size n_t) of Iso-CTS for rank r: the task-specific total rounded (Python's
    banker's rounding, as the reference) to a multiple of T, so c + T n_t = r."""
    common = int(r * common_fraction)
    task_total = round((r - common) / tasks) * tasks
    common = r - task_total
    return common, int((r - common) / tasks)


def assemble_isotropic(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """mean(s) * polar(U) @ polar(Vh): Iso-CTS's update from its stacked bases."""
    return s.mean() * (polar(u) @ polar(vh))
