"""The batched conjugate gradient against direct solves, and its per-system stopping."""

from __future__ import annotations

import pytest
import torch

from mergeflow.solvers import conjugate_gradient


def _spd(batch: int, n: int, seed: int, jitter: float = 0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, n, generator=g, dtype=torch.float64)
    return x @ x.transpose(1, 2) / n + jitter * torch.eye(n, dtype=torch.float64)


def test_batched_systems_match_the_direct_solve():
    m = _spd(4, 20, 0)
    b = torch.randn(4, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    result = conjugate_gradient(lambda v: (m @ v.unsqueeze(-1)).squeeze(-1), b, max_iter=200, tol=1e-12,
                                dtype=torch.float64)
    assert result.x.dtype == torch.float64
    assert torch.allclose(result.x, torch.linalg.solve(m, b), atol=1e-10, rtol=0)
    assert bool(result.converged.all()) and float(result.residual.max()) <= 1e-12
    assert int(result.iterations.max()) <= 40


def test_float32_by_default_within_1e5_of_the_closed_form():
    m = _spd(2, 10, 2)
    b = torch.randn(2, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    result = conjugate_gradient(lambda v: (m.float() @ v.unsqueeze(-1)).squeeze(-1), b)
    assert result.x.dtype == torch.float32 and bool(result.converged.all())
    assert torch.allclose(result.x.double(), torch.linalg.solve(m, b), atol=1e-5, rtol=0)


def test_matrix_shaped_systems_regmean_like():
    """sum_i A_i X = sum_i A_i W_i, X of shape [in, out]: one system per layer, batched over 3 layers."""
    a = _spd(3, 6, 4)
    rhs = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    result = conjugate_gradient(lambda v: a @ v, rhs, max_iter=100, tol=1e-10, dtype=torch.float64)
    assert torch.allclose(result.x, torch.linalg.solve(a, rhs), atol=1e-5, rtol=0)
    assert result.x.shape == (3, 6, 5) and result.iterations.shape == (3,)


def test_diagonal_system_is_the_elementwise_closed_form():
    f = torch.tensor([[1.0, 2.0, 2.0, 4.0], [0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    result = conjugate_gradient(lambda v: f * v, b, dtype=torch.float64)
    assert torch.allclose(result.x, b / f, atol=1e-12, rtol=0)
    # CG needs as many iterations as distinct eigenvalues: 3 for the first system, 1 for the second
    assert result.iterations.tolist() == [3, 1]


def test_each_system_stops_on_its_own_and_the_cap_is_reported():
    m = torch.stack([torch.eye(8, dtype=torch.float64), torch.diag(torch.logspace(0, 6, 8, dtype=torch.float64))])
    b = torch.ones(2, 8, dtype=torch.float64)
    result = conjugate_gradient(lambda v: (m @ v.unsqueeze(-1)).squeeze(-1), b, max_iter=3, tol=1e-10,
                                dtype=torch.float64)
    assert result.iterations.tolist() == [1, 3]
    assert result.converged.tolist() == [True, False]
    assert float(result.residual[1]) > 1e-10
    assert torch.allclose(result.x[0], b[0])


def test_exact_start_zero_rhs_and_semidefinite_systems():
    m = _spd(1, 5, 6)
    x = torch.randn(1, 5, dtype=torch.float64)
    b = (m @ x.unsqueeze(-1)).squeeze(-1)

    def matvec(v):
        return (m @ v.unsqueeze(-1)).squeeze(-1)

    exact = conjugate_gradient(matvec, b, x0=x, dtype=torch.float64)
    assert exact.iterations.tolist() == [0] and torch.equal(exact.x, x)
    zero = conjugate_gradient(matvec, torch.zeros(1, 5), x0=torch.ones(1, 5), dtype=torch.float64)
    assert zero.iterations.tolist() == [0] and not zero.x.any() and zero.converged.tolist() == [True]
    # a singular PSD operator with b in its range: converges, and leaves the null-space component at the start
    p = torch.diag(torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64))
    singular = conjugate_gradient(lambda v: v @ p, torch.tensor([[4.0, 1.0, 0.0]]), x0=torch.tensor([[0.0, 0, 7]]),
                                  dtype=torch.float64)
    assert torch.allclose(singular.x, torch.tensor([[2.0, 1.0, 7.0]], dtype=torch.float64))
    assert singular.converged.tolist() == [True]


def test_invalid_arguments():
    with pytest.raises(ValueError, match="max_iter"):
        conjugate_gradient(lambda v: v, torch.ones(1, 2), max_iter=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_the_tensors_device():
    m = _spd(2, 16, 7).cuda()
    b = torch.ones(2, 16, dtype=torch.float64, device="cuda")
    result = conjugate_gradient(lambda v: (m @ v.unsqueeze(-1)).squeeze(-1), b, dtype=torch.float64, tol=1e-10)
    assert result.x.is_cuda and result.iterations.is_cuda
    assert torch.allclose(result.x.cpu(), torch.linalg.solve(m.cpu(), b.cpu()), atol=1e-8, rtol=0)
