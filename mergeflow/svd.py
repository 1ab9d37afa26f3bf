"""Truncated SVD helpers for per-layer subspaces (always computed in fp32)."""

from __future__ import annotations

import torch


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` thin SVD of a matrix or a batch of matrices [..., m, n]: (U [..., m, r], S [..., r], Vh [..., r, n])."""
    if matrix.dim() < 2:
        raise ValueError(f"SVD needs a matrix, got shape {tuple(matrix.shape)}")
    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    rank = max(0, min(rank, s.shape[-1]))
    return u[..., :rank], s[..., :rank], vh[..., :rank, :]


def low_rank_approximation(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """Best rank-`rank` approximation (Eckart-Young) in fp32."""
    u, s, vh = truncated_svd(matrix, rank)
    return (u * s.unsqueeze(-2)) @ vh


def left_basis(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """Orthonormal basis [m, rank] of the top-`rank` left singular subspace (store this, never the m x m projector)."""
    return truncated_svd(matrix, rank)[0]


def project_out(gradient: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """g - Q (Q^T g): remove the component of `gradient` [m, n] in the column space of `basis` [m, r]."""
    return gradient - basis @ (basis.transpose(-1, -2) @ gradient)
