"""The symmetric eigendecomposition behind every subspace method (TSV-M, Iso-C, Iso-CTS, DOGE), timed alone and
inside a TSV-M layer, in one run.

Alone: the float64 Gram of a random matrix decomposed by each CPU routine, each timed right after a warm-up call
of its own (so that no other library's threads are running):
  torch        torch.linalg.eigh (MKL in the PyPI CPU wheel): what Mergeflow uses
  scipy evr    scipy.linalg.eigh(driver="evr", subset_by_index=...): MRRR for the top n/8 eigenpairs only
  scipy evd    scipy.linalg.eigh(driver="evd"): divide and conquer in scipy's own LAPACK (OpenBLAS), all of them
In a TSV-M layer: `mergeflow.subspace.layer_factors("task", ...)` on 8 random task vectors (768 x 768 and
3072 x 768), with torch's decomposition against scipy's MRRR, alternating. scipy's OpenBLAS threads keep spinning
after each call and slow the torch products that come next, which the routines timed alone do not show.

    python benchmarks/eigh_speed.py                 # n = 384, 768, 1024 (MiniLM, ViT-B/32, ViT-L/14 widths)
    python benchmarks/eigh_speed.py --sizes 768 --repeats 9
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from scipy.linalg import eigh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing mergeflow


def _timed(call, repeats: int) -> float:
    call()  # warm-up: this routine's threads awake, the others' idle
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="384,768,1024")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(args.seed)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats} ms per call")
    print(f"{'n':>6} {'torch':>9} {'scipy evd':>10} {'scipy evr top n/8':>18} {'evd speed-up':>13} "
          f"{'evr speed-up':>13}")
    for n in (int(size) for size in args.sizes.split(",")):
        a = torch.randn(n, 3 * n, dtype=torch.float64, generator=generator)
        gram = a @ a.mT
        k = n // 8
        array = gram.numpy()
        full = torch.linalg.eigh(gram).eigenvalues
        values_evd = torch.from_numpy(eigh(array, driver="evd", eigvals_only=True))
        values_evr = torch.from_numpy(eigh(array, driver="evr", subset_by_index=[n - k, n - 1], eigvals_only=True))
        scale = full.abs().max()
        assert (values_evd - full).abs().max() <= 1e-10 * scale, "scipy evd disagrees with torch"
        assert (values_evr - full[n - k:]).abs().max() <= 1e-10 * scale, "scipy evr disagrees with torch"
        ms = {"torch": [], "evd": [], "evr": []}
        for _ in range(args.repeats):  # alternate, so that a slow spell of the machine hits all three
            ms["torch"].append(_timed(lambda: torch.linalg.eigh(gram), 1))
            ms["evd"].append(_timed(lambda: eigh(array, driver="evd", check_finite=False), 1))
            ms["evr"].append(_timed(lambda: eigh(array, driver="evr", subset_by_index=[n - k, n - 1],
                                                 check_finite=False), 1))
        med = {key: statistics.median(values) for key, values in ms.items()}
        print(f"{n:>6} {med['torch']:>9.1f} {med['evd']:>10.1f} {med['evr']:>18.1f} "
              f"{med['torch'] / med['evd']:>12.2f}x {med['torch'] / med['evr']:>12.2f}x")

    print_in_layer(args.repeats)


def print_in_layer(repeats: int) -> None:
    """Seconds of one TSV-M layer's factors (8 tasks) with torch's and with scipy's MRRR top-k decomposition."""
    from mergeflow import subspace

    torch_top = subspace._top_eigenpairs

    def scipy_top(gram: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = gram.shape[0]
        values, vectors = eigh(gram.numpy(), subset_by_index=[n - k, n - 1], driver="evr")
        return torch.from_numpy(values).flip(-1), torch.from_numpy(vectors).flip(-1)

    print("\nTSV-M factors of one layer, 8 tasks (median seconds):")
    generator = torch.Generator().manual_seed(1)
    for m, n in ((768, 768), (3072, 768)):
        task_vectors = torch.randn(8, m, n, generator=generator) * torch.logspace(0, -2, n)
        seconds = {"torch": [], "scipy MRRR": []}
        try:
            for _ in range(repeats):
                for name, top in (("torch", torch_top), ("scipy MRRR", scipy_top)):
                    subspace._top_eigenpairs = top
                    started = time.perf_counter()
                    subspace.layer_factors("task", task_vectors)
                    seconds[name].append(time.perf_counter() - started)
        finally:
            subspace._top_eigenpairs = torch_top
        med = {name: statistics.median(values) for name, values in seconds.items()}
        print(f"  {m} x {n}: torch {med['torch']:.3f} s, scipy MRRR {med['scipy MRRR']:.3f} s "
              f"({med['scipy MRRR'] / med['torch']:.2f}x torch's time)")


if __name__ == "__main__":
    main()
