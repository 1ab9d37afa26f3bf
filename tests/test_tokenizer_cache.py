"""The text family loads a model folder's tokenizer once per thread, and again once a file there changed."""

from __future__ import annotations

import os
import shutil
import threading

from mergeflow.families.text.encoder import cached_tokenizer, minilm_path


def test_one_tokenizer_per_thread_and_folder_until_a_file_changes(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(minilm_path(), folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    first = cached_tokenizer(folder)
    assert cached_tokenizer(folder) is first
    assert first("a test", return_tensors="pt")["input_ids"].shape[1] > 2

    other: list = []
    thread = threading.Thread(target=lambda: other.append(cached_tokenizer(folder)))
    thread.start(), thread.join()
    assert other[0] is not first  # a fast tokenizer is not shared between threads

    vocab = folder / "vocab.txt"
    stat = vocab.stat()
    os.utime(vocab, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the folder's files changed
    again = cached_tokenizer(folder)
    assert again is not first and cached_tokenizer(folder) is again
