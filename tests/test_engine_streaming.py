"""The engine reads each input once per pass, on every core: read-ahead bounded by a window, NaN/Inf checked as
tensors stream in, TIES electing its majority sign in the merge pass (corrections patched into the output)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from mergeflow.checkpoints import open_checkpoint
from mergeflow.checkpoints.reader import Checkpoint, StateDictSource, TensorInfo
from mergeflow.checkpoints.writer import ShardedSafetensorsWriter
from mergeflow.errors import CheckpointError, OverflowInMergeError
from mergeflow.merge import merge_checkpoints, merge_state_dicts
from mergeflow.methods import build_method
from mergeflow.parallel import read_ahead
from mergeflow.task_vectors import ExpertPool


def test_read_ahead_keeps_order_window_and_releases():
    flight, peak, released = [0], [0], []
    lock = threading.Lock()

    def produce(x: int) -> int:
        with lock:
            flight[0] += x
            peak[0] = max(peak[0], flight[0])
        return x

    def release(x: int) -> None:
        with lock:
            flight[0] -= x
        released.append(x)

    items = [3, 1, 4, 1, 5, 9, 2, 6]
    got = []
    for x in read_ahead(produce, items, cost=lambda x: x, window=10, release=release):
        time.sleep(0.005)  # a slow consumer: the producer runs ahead up to the window
        got.append(x)
    assert got == items and released == items[:-1]
    assert peak[0] <= max(10, max(a + b for a, b in zip(items, items[1:])))  # two items are always allowed


def test_read_ahead_raises_at_the_failing_item_and_stops_on_close():
    def produce(x: int) -> int:
        if x == 3:
            raise ValueError("bad item 3")
        return x

    got = []
    with pytest.raises(ValueError, match="bad item 3"):
        for x in read_ahead(produce, [1, 2, 3, 4], cost=lambda x: 1, window=100):
            got.append(x)
    assert got == [1, 2]
    before = threading.active_count()
    stream = read_ahead(lambda x: x, list(range(1000)), cost=lambda x: 1, window=4)
    assert next(stream) == 0
    stream.close()  # as on Ctrl-C in the consumer: the thread ends
    assert threading.active_count() <= before


def _models(tmp_path, tensors: int = 6):
    """Base and 3 experts whose coordinate 0 of tensor w0 cancels exactly, and whose other coordinates vote
    mostly negative: the model-wide majority sign is -, known only after the last tensor."""
    g = torch.Generator().manual_seed(0)
    base = {f"w{i}": torch.randn(64, 32, generator=g) for i in range(tensors)}
    base["ids"] = torch.arange(5)
    base["w0"][0, 0] = 0.0  # so that +2 and -2 are exact task-vector entries
    experts = []
    for e in range(3):
        expert = {k: v.clone() for k, v in base.items()}
        for i in range(tensors):
            expert[f"w{i}"] += -0.5 * torch.rand(64, 32, generator=g) - 0.01
        experts.append(expert)
    experts[0]["w0"][0, 0], experts[1]["w0"][0, 0], experts[2]["w0"][0, 0] = 2.0, -2.0, 0.0
    paths = []
    for name, sd in [("base", base)] + [(f"e{i}", sd) for i, sd in enumerate(experts)]:
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
        paths.append(str(tmp_path / f"{name}.safetensors"))
    return base, experts, paths


def test_ties_elects_the_majority_in_the_merge_pass_and_patches_what_it_decides(tmp_path, cache, monkeypatch):
    base, experts, paths = _models(tmp_path)
    params = {"density": 0.5, "scaling": 1.0}
    reads = []
    original = Checkpoint._read  # every read of a tensor's bytes: get, get_rows and the pool's scratch reads
    monkeypatch.setattr(Checkpoint, "_read", lambda self, name, *a: reads.append(name) or original(self, name, *a))
    result = merge_checkpoints("ties", paths[0], paths[1:], str(tmp_path / "out"), params, cache=cache)
    monkeypatch.undo()
    assert result.state["majority_sign"] == -1
    merged = open_checkpoint(str(tmp_path / "out"), cache=cache)
    # the cancelled coordinate takes the negative entry, as the two-pass reference (prepare) decides
    assert float(merged.get("w0")[0, 0]) == -2.0
    two_pass = merge_state_dicts("ties", base, experts, params,
                                 state=build_method("ties", params).prepare(_pool(base, experts)))
    assert all(torch.equal(merged.get(k), two_pass[k]) for k in two_pass)
    assert result.state["majority_sign"] == -1
    # 3 passes over the 6 float tensors of 4 inputs (2 top-k + the merge; no check or sign pass of their own)
    assert reads.count("w3") == 3 * 4


def _pool(base, experts):
    return ExpertPool(StateDictSource(base), [StateDictSource(e) for e in experts], ["a", "b", "c"])


@pytest.mark.parametrize("method", ["task_arithmetic", "dare", "average"])
def test_single_pass_methods_read_each_input_tensor_once(tmp_path, cache, monkeypatch, method):
    _, _, paths = _models(tmp_path)
    reads = []
    original = Checkpoint._read
    monkeypatch.setattr(Checkpoint, "_read", lambda self, name, *rows:
                        reads.append((self.uri, name)) or original(self, name, *rows))
    merge_checkpoints(method, paths[0], paths[1:], str(tmp_path / "out"), cache=cache)
    assert len(reads) == len(set(reads)) == 4 * 6 + 1  # every float tensor of 4 inputs once, the ids once


def test_nan_found_while_streaming_names_file_and_tensor_and_writes_nothing(tmp_path, cache):
    base, experts, paths = _models(tmp_path)
    experts[2]["w5"][3, 3] = float("nan")  # the last tensor: found in the merge pass itself
    save_file(experts[2], paths[3])
    with pytest.raises(CheckpointError, match="1 NaN") as info:
        merge_checkpoints("task_arithmetic", paths[0], paths[1:], str(tmp_path / "out"), cache=cache)
    assert info.value.file == paths[3] and info.value.tensor == "w5"
    assert not (tmp_path / "out").exists()


def test_an_overflowing_merge_of_finite_inputs_says_so(tmp_path, cache):
    base = {"w": torch.zeros(4)}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file({"w": torch.full((4,), 3e38)}, str(tmp_path / "e.safetensors"))
    paths = [str(tmp_path / f"{n}.safetensors") for n in ("base", "e", "e")]
    with pytest.raises(OverflowInMergeError, match="'w' gives values beyond float32"):
        merge_checkpoints("task_arithmetic", paths[0], paths[1:], str(tmp_path / "out"), {"scaling": 1.0},
                          cache=cache)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare", "average"])
def test_a_small_window_merges_in_blocks_of_rows_with_the_same_result(tmp_path, cache, monkeypatch, method):
    base, experts, paths = _models(tmp_path)
    monkeypatch.setattr("mergeflow.sparsify._DARE_BLOCK", 100)  # DARE's mask blocks straddle the row blocks
    merge_checkpoints(method, paths[0], paths[1:], str(tmp_path / "whole"), cache=cache)
    rows_read = []
    original = Checkpoint._read
    monkeypatch.setattr(Checkpoint, "_read", lambda self, name, start, stop, *buffer:
                        (name != "ids" and rows_read.append(stop - start)) or original(self, name, start, stop, *buffer)
                        )
    # 4 inputs x 32 fp32 values a row: a 2 KB window holds 2 rows of each block
    result = merge_checkpoints(method, paths[0], paths[1:], str(tmp_path / "blocks"), cache=cache, window=2048)
    assert rows_read and max(rows_read) <= 2
    whole = open_checkpoint(str(tmp_path / "whole"), cache=cache)
    blocks = open_checkpoint(str(tmp_path / "blocks"), cache=cache)
    assert all(torch.equal(whole.get(k), blocks.get(k)) for k in whole.keys())
    in_memory = merge_state_dicts(method, base, experts)  # the dict path joins its blocks the same way
    assert all(torch.equal(in_memory[k], blocks.get(k)) for k in in_memory)
    if method == "ties":
        assert result.state["majority_sign"] == -1 and float(blocks.get("w0")[0, 0]) == pytest.approx(-0.6)


@pytest.mark.parametrize("method, params, experts, passes", [
    ("slerp", {"t": 0.3}, 1, 2), ("dare_ties", {"density": 0.5}, 3, 2),
    ("dare_ties", {"density": 0.5, "normalize": True, "weight": [0.5, 1.0]}, 3, 2),
    ("dare_ties", {"density": 0.5, "rescale": False}, 3, 1), ("task_arithmetic_weighted", {"weight": 0.7}, 3, 1)])
def test_two_pass_methods_merge_a_large_tensor_in_blocks_with_the_same_result(tmp_path, cache, monkeypatch, method,
                                                                             params, experts, passes):
    base, others, paths = _models(tmp_path)
    monkeypatch.setattr("mergeflow.sparsify._DARE_BLOCK", 100)  # DARE's mask blocks straddle the tiles and blocks
    monkeypatch.setattr("mergeflow.methods.base.TILE", 64)  # tiles of 2 rows of 32
    inputs = paths[1:1 + experts]
    merge_checkpoints(method, paths[0], inputs, str(tmp_path / "whole"), params, cache=cache)
    rows_read = []
    original = Checkpoint._read
    monkeypatch.setattr(Checkpoint, "_read", lambda self, name, start, stop, *buffer:
                        rows_read.append((name, start, stop)) or original(self, name, start, stop, *buffer))
    # (experts + 1) fp32 inputs x 32 values a row against a 2 KB window: blocks of 2 (3 experts) or 4 rows (SLERP)
    merge_checkpoints(method, paths[0], inputs, str(tmp_path / "blocks"), params, cache=cache, window=2048)
    step = 2 if experts == 3 else 4
    w3 = [stop - start for name, start, stop in rows_read if name == "w3"]
    assert w3 == [step] * (64 // step) * (experts + 1) * passes  # the sums' pass first, where the method needs it
    whole = open_checkpoint(str(tmp_path / "whole"), cache=cache)
    blocks = open_checkpoint(str(tmp_path / "blocks"), cache=cache)
    assert all(torch.equal(whole.get(k), blocks.get(k)) for k in whole.keys())
    in_memory = merge_state_dicts(method, base, others[:experts], params)
    assert all(torch.equal(in_memory[k], blocks.get(k)) for k in in_memory)


def test_writer_patches_a_written_tensor(tmp_path):
    plan = [TensorInfo("a", (4,), torch.bfloat16), TensorInfo("b", (2, 3), torch.float32)]
    writer = ShardedSafetensorsWriter(tmp_path / "w", plan)
    writer.write("a", torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(KeyError, match="not been written"):
        writer.patch("b", torch.tensor([0]), torch.tensor([1.0]))
    writer.write("b", torch.ones(2, 3))
    writer.patch("b", torch.tensor([1, 5]), torch.tensor([7.0, 8.0]))
    writer.patch("a", torch.tensor([2]), torch.tensor([3.0]))
    writer.close()
    got = open_checkpoint(str(tmp_path / "w" / "model.safetensors"))
    assert torch.equal(got.get("b"), torch.tensor([[1.0, 7.0, 1.0], [1.0, 1.0, 8.0]]))
    assert torch.equal(got.get("a"), torch.tensor([0.0, 0.0, 3.0, 0.0], dtype=torch.bfloat16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_merge_equals_the_cpu_merge(tmp_path, cache):
    _, _, paths = _models(tmp_path)
    for method in ("task_arithmetic", "ties", "dare"):
        merge_checkpoints(method, paths[0], paths[1:], str(tmp_path / f"{method}-cpu"), cache=cache, device="cpu")
        merge_checkpoints(method, paths[0], paths[1:], str(tmp_path / f"{method}-cuda"), cache=cache, device="cuda")
        cpu = open_checkpoint(str(tmp_path / f"{method}-cpu"), cache=cache)
        gpu = open_checkpoint(str(tmp_path / f"{method}-cuda"), cache=cache)
        for k in cpu.keys():
            assert torch.allclose(cpu.get(k).double(), gpu.get(k).double(), atol=1e-6), (method, k)
