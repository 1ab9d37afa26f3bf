"""Why causal-LM scoring runs in fp32 on a CPU without bf16 matrix units: one Llama-1B-shaped linear layer
([512, 2048] x [5632, 2048]^T, the MLP's up projection over 512 tokens) timed in fp32 and in bf16 on one thread, and
whether oneDNN reports native bf16 (`model_dir.native_bf16`, what `for_inference` asks).

    .venv/bin/python benchmarks/bf16_matmul.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mergeflow.families.causal_lm.model_dir import native_bf16  # noqa: E402


def gflops(dtype: torch.dtype, repeats: int = 5) -> float:
    x, w = torch.randn(512, 2048).to(dtype), torch.randn(5632, 2048).to(dtype)
    F.linear(x, w)
    started = time.perf_counter()
    for _ in range(repeats):
        F.linear(x, w)
    return 2 * 512 * 2048 * 5632 * repeats / (time.perf_counter() - started) / 1e9


def main() -> int:
    torch.set_num_threads(1)
    fp32, bf16 = gflops(torch.float32), gflops(torch.bfloat16)
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 (oneDNN): {native_bf16()}")
    print(f"linear [512, 2048] x [5632, 2048]^T, 1 thread: fp32 {fp32:.1f} GFLOPS, bf16 {bf16:.1f} GFLOPS "
          f"(fp32 / bf16 = {fp32 / bf16:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
