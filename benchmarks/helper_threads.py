"""Main-thread LAPACK after torch ran in helper threads: `mergeflow.parallel`'s worker pool and read-ahead thread
run torch on one intra-op thread each (`single_threaded_torch`). A helper thread left with torch's default gets an
OpenMP team of its own, and MKL's eigh and SVD in the main thread stay slower for the rest of the process.

Each variant runs in a fresh child process: the main thread times a float64 eigh (the subspace stage's Gram
decomposition) and a thin SVD, then a two-thread pool runs a few torch ops (task-vector subtractions, as
`ExpertPool.task_vectors` does), then the main thread times them again. Printed: each variant's times, before and
after, and the slowdown.

    python benchmarks/helper_threads.py             # n = 384 (MiniLM's width); ~20 s
    python benchmarks/helper_threads.py --size 768 --repeats 20
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(variant: str, size: int, repeats: int) -> dict[str, float]:
    """In this process: main-thread eigh and SVD times (ms) before and after a helper pool ran torch ops."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    sys.path.insert(0, str(ROOT))
    from mergeflow.parallel import single_threaded_torch

    a = torch.randn(size, size, dtype=torch.float64)
    gram, tall = a @ a.mT, torch.randn(4 * size, size, dtype=torch.float64)

    def timed() -> tuple[float, float]:
        torch.linalg.eigh(gram), torch.linalg.svd(tall, full_matrices=False)  # warm-up
        started = time.perf_counter()
        for _ in range(repeats):
            torch.linalg.eigh(gram)
        eigh = (time.perf_counter() - started) / repeats
        started = time.perf_counter()
        for _ in range(repeats):
            torch.linalg.svd(tall, full_matrices=False)
        return 1000 * eigh, 1000 * (time.perf_counter() - started) / repeats

    before = timed()
    initializer = single_threaded_torch if variant == "one thread" else None
    with ThreadPoolExecutor(2, initializer=initializer) as pool:
        x, y = torch.randn(4, size, 4 * size), torch.randn(4, size, 4 * size)
        list(pool.map(lambda i: x[i] - y[i], range(4)))
        after = timed()  # the pool's threads are alive, idle, as mergeflow's stay
    return {"eigh before": before[0], "eigh after": after[0], "svd before": before[1], "svd after": after[1]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.size, args.repeats)))
        return 0
    for variant in ("torch's default", "one thread"):
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--size", str(args.size),
                              "--repeats", str(args.repeats)], capture_output=True, text=True, check=True)
        t = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"helper threads with {variant:15}: eigh {t['eigh before']:6.1f} -> {t['eigh after']:6.1f} ms "
              f"({t['eigh after'] / t['eigh before']:.2f}x), svd {t['svd before']:6.1f} -> {t['svd after']:6.1f} ms "
              f"({t['svd after'] / t['svd before']:.2f}x)  [{args.size} x {args.size} float64, main thread]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
