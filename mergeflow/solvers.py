"""A torch-native conjugate gradient, batched over independent symmetric positive (semi-)definite systems.

Each system i solves M_i x_i = b_i where `matvec` applies every M_i at once to a batch `[B, *shape]`. Inner
products run over all dimensions but the first, so a system is any tensor shape (a weight matrix, a vector).
Each system stops on its own when its relative residual ||b - M x|| <= tol * ||b|| (or on a non-positive
curvature p^T M p, which a singular M can give), and the loop ends when every system has stopped or after
`max_iter` iterations. Everything stays on the tensors' device; no host round trip but one flag per iteration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mergeflow import stopping
from mergeflow.warm_start import Resume


_KEPT = ("x", "r", "p", "rr", "iterations", "active")  # what the next iteration reads


@dataclass(frozen=True)
class CGResult:
    x: Tensor  # [B, *shape] solutions
    iterations: Tensor  # [B] int64: iterations each system ran
    residual: Tensor  # [B] relative residual ||b - M x|| / ||b||, recomputed from the returned x
    converged: Tensor  # [B] bool: residual <= tol


def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, x0: Tensor | None = None, *,
                       max_iter: int = 100, tol: float = 1e-6, dtype: torch.dtype = torch.float32,
                       resume: Resume | None = None) -> CGResult:
    """Solve the B systems M_i x_i = b_i from `x0` (zeros by default) in `dtype` (float32 or float64).

    A system with b_i = 0 has the solution 0 and returns it without iterating. `resume`: continue from a kept state
    of fewer iterations (its iterate, residual, direction and flags: the same bits as running them all here), and
    keep this run's end state.
    """
    if max_iter < 0 or tol < 0:
        raise ValueError(f"max_iter and tol must be non-negative, got {max_iter}, {tol}")
    b = b.to(dtype)

    def dot(u: Tensor, v: Tensor) -> Tensor:
        return (u * v).reshape(u.shape[0], -1).sum(dim=1)

    def per_system(s: Tensor) -> Tensor:
        return s.reshape(-1, *([1] * (b.dim() - 1)))

    b_norm = dot(b, b).sqrt()
    target = tol * b_norm
    found = resume.start(max_iter) if resume is not None else None
    if found is not None:
        done, kept = found
        x, r, p, rr, iterations, active = (kept[k].to(b.device) for k in _KEPT)
    else:
        done = 0
        x = torch.zeros_like(b) if x0 is None else x0.to(b.device, dtype).clone()
        x = torch.where(per_system(b_norm == 0), 0.0, x)
        r = b - matvec(x)
        p = r.clone()
        rr = dot(r, r)
        iterations = torch.zeros(b.shape[0], dtype=torch.int64, device=b.device)
        active = rr.sqrt() > target
    for _ in range(max_iter - done):
        stopping.check()
        if not bool(active.any()):
            break
        mp = matvec(p)
        pmp = dot(p, mp)
        step = active & (pmp > 0)
        alpha = torch.where(step, rr / torch.where(step, pmp, 1.0), 0.0)
        x = x + per_system(alpha) * p
        r = r - per_system(alpha) * mp
        rr_next = dot(r, r)
        beta = torch.where(step, rr_next / torch.where(rr > 0, rr, 1.0), 0.0)
        p = r + per_system(beta) * p
        rr = rr_next
        iterations += step
        active = step & (rr.sqrt() > target)
    if resume is not None and max_iter > done:
        resume.end(max_iter, dict(zip(_KEPT, (x, r, p, rr, iterations, active))))
    final = b - matvec(x)
    true_residual = dot(final, final).sqrt()
    relative = torch.where(b_norm > 0, true_residual / torch.where(b_norm > 0, b_norm, 1.0), true_residual)
    return CGResult(x, iterations, relative, relative <= tol)
