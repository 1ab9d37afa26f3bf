"""The symmetric eigendecomposition behind every subspace method (TSV-M, Iso-C, Iso-CTS, DOGE): the float64 Gram
of a layer's task vector, decomposed by each candidate CPU routine, in one run, the routines alternating.

  torch        torch.linalg.eigh (MKL in the PyPI CPU wheel): what Mergeflow uses for every eigenpair (Iso-C, the
               polar factors) and on a GPU
  scipy evr    scipy.linalg.eigh(driver="evr", subset_by_index=...): MRRR for the top n/8 eigenpairs only, what
               Mergeflow uses on the CPU for TSV-M's and DOGE's per-task bases (k = r / T)
  scipy evd    scipy.linalg.eigh(driver="evd"): divide and conquer in scipy's own LAPACK, all eigenpairs; measured,
               not used (faster than torch's below n = 768, not at 768 and above, on these VMs)

Prints the median milliseconds per decomposition at each size and the ratios to torch's, and checks that the
three agree on the eigenvalues.

    python benchmarks/eigh_speed.py                 # n = 384, 768, 1024 (MiniLM, ViT-B/32, ViT-L/14 widths)
    python benchmarks/eigh_speed.py --sizes 768 --repeats 9
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from scipy.linalg import eigh


def _timed(call, repeats: int) -> float:
    call()
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


if __name__ == "__main__":
    main()
