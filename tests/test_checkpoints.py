"""Checkpoint reading and writing: formats, lazy access, sharding, provenance, digests, the content cache."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergeflow.checkpoints import ShardedSafetensorsWriter, StateDictSource, TensorInfo, open_checkpoint, parse_size
from mergeflow.checkpoints.convert import convert_legacy
from mergeflow.errors import CheckpointError, UnsafeCheckpointError
from mergeflow.storage import sha256_file

from factories import tiny_state_dict


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_safetensors_single_file_reads_every_tensor_exactly(tmp_path, cache):
    sd = tiny_state_dict(dtype=torch.bfloat16)
    save_file(sd, str(tmp_path / "m.safetensors"), metadata={"k": "v"})
    ckpt = open_checkpoint(str(tmp_path / "m.safetensors"), cache=cache)
    assert _equal({k: ckpt.get(k) for k in ckpt.keys()}, sd)
    assert ckpt.metadata == {"k": "v"}
    assert ckpt.info("embeddings.position_ids").dtype == torch.int64
    assert ckpt.digest == sha256_file(tmp_path / "m.safetensors")


def test_file_url_and_directory_resolve_to_the_same_checkpoint(tmp_path, cache):
    sd = tiny_state_dict()
    (tmp_path / "d").mkdir()
    save_file(sd, str(tmp_path / "d" / "model.safetensors"))
    by_dir = open_checkpoint(str(tmp_path / "d"), cache=cache)
    by_url = open_checkpoint(f"file://{tmp_path}/d/model.safetensors", cache=cache)
    assert by_dir.digest == by_url.digest
    assert _equal({k: by_url.get(k) for k in by_url.keys()}, sd)


def test_writer_shards_and_reader_reads_the_hf_index_layout(tmp_path, cache):
    sd = tiny_state_dict()
    plan = [TensorInfo(k, tuple(v.shape), v.dtype) for k, v in sd.items()]
    writer = ShardedSafetensorsWriter(tmp_path / "out", plan, shard_size=400, metadata={"method": "x"})
    for k in reversed(list(sd)):  # any order
        writer.write(k, sd[k])
    files = writer.close()
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in files
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(sd)
    for shard in shards:  # every shard is a valid safetensors file on its own, with the provenance
        assert load_file(str(tmp_path / "out" / shard))
    ckpt = open_checkpoint(str(tmp_path / "out"), cache=cache)
    assert _equal({k: ckpt.get(k) for k in ckpt.keys()}, sd)
    assert ckpt.metadata["method"] == "x"
    assert files[shards[0]] == sha256_file(tmp_path / "out" / shards[0])


def test_writer_refuses_wrong_shapes_and_missing_tensors(tmp_path):
    plan = [TensorInfo("a", (2, 2), torch.float32), TensorInfo("b", (3,), torch.float32)]
    writer = ShardedSafetensorsWriter(tmp_path / "o", plan)
    with pytest.raises(ValueError, match="'a'"):
        writer.write("a", torch.zeros(3))
    writer.write("a", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="never written"):
        writer.close()


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1GiB") == 2**30 and parse_size(123) == 123
    with pytest.raises(ValueError):
        parse_size("lots")


def test_pt_state_dict_loads_with_weights_only(tmp_path, cache):
    sd = tiny_state_dict()
    torch.save(sd, tmp_path / "m.pt")
    torch.save({"state_dict": sd}, tmp_path / "wrapped.bin")
    for name in ("m.pt", "wrapped.bin"):
        ckpt = open_checkpoint(str(tmp_path / name), cache=cache)
        assert _equal({k: ckpt.get(k) for k in ckpt.keys()}, sd)


def test_pickled_module_is_refused_and_points_to_convert(tmp_path, cache):
    torch.save(torch.nn.Linear(3, 2), tmp_path / "module.pt")
    with pytest.raises(UnsafeCheckpointError, match="mergeflow convert") as info:
        open_checkpoint(str(tmp_path / "module.pt"), cache=cache)
    assert "module.pt" in str(info.value)


def test_convert_turns_a_trusted_module_into_safetensors(tmp_path, cache):
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    torch.save(module, tmp_path / "module.pt")
    out = tmp_path / "module.safetensors"
    convert_legacy(str(tmp_path / "module.pt"), str(out), cache=cache)
    ckpt = open_checkpoint(str(out), cache=cache)
    assert _equal({k: ckpt.get(k) for k in ckpt.keys()}, module.state_dict())
    assert ckpt.metadata["source_sha256"] == sha256_file(tmp_path / "module.pt")
    with pytest.raises(FileExistsError):
        convert_legacy(str(tmp_path / "module.pt"), str(out), cache=cache)


def test_truncated_safetensors_names_file_and_tensor(tmp_path, cache):
    save_file(tiny_state_dict(), str(tmp_path / "m.safetensors"))
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated") as info:
        open_checkpoint(str(tmp_path / "cut.safetensors"), cache=cache)
    assert "cut.safetensors" in str(info.value) and info.value.tensor


@pytest.mark.parametrize("content", [b"", b"\x00" * 4, b"garbage that is not safetensors at all"])
def test_unreadable_files_name_the_file(tmp_path, cache, content):
    (tmp_path / "bad.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        open_checkpoint(str(tmp_path / "bad.safetensors"), cache=cache)


def test_missing_file_and_corrupt_pt(tmp_path, cache):
    with pytest.raises(CheckpointError, match="nope.safetensors"):
        open_checkpoint(str(tmp_path / "nope.safetensors"), cache=cache)
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="bad.pt"):
        open_checkpoint(str(tmp_path / "bad.pt"), cache=cache)


def test_local_digest_is_remembered_until_the_file_changes(tmp_path, cache):
    path = tmp_path / "m.safetensors"
    save_file(tiny_state_dict(0), str(path))
    first = cache.fetch(str(path))
    assert cache.fetch(str(path)).sha256 == first.sha256
    save_file(tiny_state_dict(1), str(path))
    assert cache.fetch(str(path)).sha256 == sha256_file(path) != first.sha256


@pytest.mark.parametrize("part", ["../x", "a/../../b", "/etc/passwd", "./a", "a\\b"])
def test_object_keys_cannot_escape_their_prefix(part):
    from mergeflow.storage import join

    with pytest.raises(ValueError, match="unsafe object key"):
        join("s3://bucket/root", part)
    assert join("s3://bucket/root/", "merged", "demo/ties-1") == "s3://bucket/root/merged/demo/ties-1"


def test_save_safetensors_bytes_depend_only_on_content(tmp_path):
    """Two processes (different hash seeds) write identical bytes; safetensors reads them back exactly."""
    import subprocess
    import sys

    from safetensors.torch import load_file, safe_open

    script = (
        "import sys, torch\n"
        "from mergeflow.checkpoints.safetensors_format import save_safetensors\n"
        "g = torch.Generator().manual_seed(0)\n"
        "t = {'b.weight': torch.randn(3, 4, generator=g), 'a.bias': torch.randn(5, generator=g).bfloat16(),\n"
        "     'ids': torch.arange(6), 'scale': torch.tensor(2.5)}\n"
        "save_safetensors(t, sys.argv[1], {f'key{i}': str(i) for i in range(20)})\n"
    )
    for i, seed in enumerate(("1", "2")):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / f"{i}.safetensors")], check=True,
                       env={**__import__("os").environ, "PYTHONHASHSEED": seed})
    first, second = (tmp_path / "0.safetensors").read_bytes(), (tmp_path / "1.safetensors").read_bytes()
    assert first == second
    loaded = load_file(str(tmp_path / "0.safetensors"))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(loaded["b.weight"], torch.randn(3, 4, generator=g))
    assert loaded["a.bias"].dtype == torch.bfloat16 and torch.equal(loaded["ids"], torch.arange(6))
    assert loaded["scale"].shape == () and float(loaded["scale"]) == 2.5
    with safe_open(str(tmp_path / "0.safetensors"), "pt") as f:
        assert f.metadata()["key7"] == "7"


def test_scratch_reads_reuse_one_buffer_and_a_nested_read_gets_its_own(tmp_path, cache):
    """The engine's read-ahead copies each tensor at once: `scratch` reads it into the checkpoint's reusable buffer
    (no fresh pages per tensor), the values those of `get`; a read while the buffer is out gets memory of its own."""
    tensors = {"a": torch.randn(64, 32), "b": torch.randn(16, 32).bfloat16(), "c": torch.randn(64, 32)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    ckpt = open_checkpoint(str(tmp_path / "m.safetensors"), cache=cache)
    with ckpt.scratch("a") as a:
        assert torch.equal(a, tensors["a"])
        first = a.untyped_storage().data_ptr()
        with ckpt.scratch("c") as c:  # the buffer is out: its own memory
            assert torch.equal(c, tensors["c"]) and c.untyped_storage().data_ptr() != first
    with ckpt.scratch("b") as b, ckpt.scratch("a", (8, 24)) as rows:
        kept = (first, c.untyped_storage().data_ptr())
        assert torch.equal(b, tensors["b"]) and b.untyped_storage().data_ptr() in kept
        assert torch.equal(rows, tensors["a"][8:24])
    with ckpt.scratch("c") as again:
        assert again.untyped_storage().data_ptr() in kept


def test_a_merged_tensor_in_the_pools_recycled_buffer_is_copied_before_it_is_written(tmp_path):
    """A method may return the base itself or its result in the task vectors' buffer, which the read-ahead refills
    while the writer may still hold the tensor: the engine hands the writer a copy (into the writer's reused memory
    where it has one), never the buffer; a new tensor in the output dtype passes as it is."""
    from mergeflow.task_vectors import ExpertPool

    flat = torch.randn(3 * 8)
    base, task_vectors = flat[:8].view(2, 4), flat[8:].view(2, 2, 4)
    pool = ExpertPool(StateDictSource({"w": base}), [], ["e"], torch.device("cpu"))
    for merged in (base, task_vectors[1]):
        out = pool.output(merged, torch.float32, base)
        assert torch.equal(out, merged) and out.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr()
    fresh = base + task_vectors.sum(0)
    assert pool.output(fresh, torch.float32, base) is fresh
    writer = ShardedSafetensorsWriter(tmp_path, [TensorInfo("w", (2, 4), torch.bfloat16)])
    pool.out_buffers = writer.buffer
    out = pool.output(task_vectors[0], torch.bfloat16, base)
    assert out.dtype == torch.bfloat16 and torch.equal(out, task_vectors[0].bfloat16())
    assert out.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr()
    writer.write("w", out)
    writer.close()
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["w"], task_vectors[0].bfloat16())
    assert writer._memory._kept and not writer._lent  # the memory is back for the next tensor once written


def test_buffer_pool_leaves_large_buffers_to_large_tensors_and_keeps_within_its_limits():
    from mergeflow.buffers import BufferPool

    pool = BufferPool(torch.float32, count=2)
    big, small = pool.take(1000), pool.take(100)
    pool.give(big)
    pool.give(small[:50])  # a view: its whole buffer comes back
    assert pool.take(100).data_ptr() == small.data_ptr()  # not the 1000-element one (over 4x)
    assert pool.take(300).data_ptr() == big.data_ptr()
    assert pool.take(300).data_ptr() not in (big.data_ptr(), small.data_ptr())  # nothing kept fits: fresh
    for buffer in (pool.take(10), pool.take(20), pool.take(30)):
        pool.give(buffer, max_bytes=4 * 45)
    assert sorted(b.numel() for b in pool._kept) == [10, 30]  # largest first within 180 bytes: 20 would not fit


def test_write_file_streams_one_file_whole_or_not_at_all(tmp_path):
    from mergeflow.checkpoints.writer import write_file

    state = tiny_state_dict()
    plan = [TensorInfo(name, tuple(t.shape), t.dtype) for name, t in state.items()]
    digest = write_file(tmp_path / "u.safetensors", plan, lambda w: [w.write(n, t) for n, t in state.items()])
    assert digest == sha256_file(tmp_path / "u.safetensors")
    assert all(torch.equal(t, state[n]) for n, t in load_file(str(tmp_path / "u.safetensors")).items())

    def half_then_fail(writer):
        name = next(iter(state))
        writer.write(name, state[name])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_file(tmp_path / "v.safetensors", plan, half_then_fail)
    with pytest.raises(ValueError, match="never written"):  # a fill that stops short is not a file
        write_file(tmp_path / "w.safetensors", plan, lambda w: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u.safetensors"]


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_tensors_leave_the_rss_once_released():
    """Memory freed between tensors still alive stays in the process's RSS (malloc keeps the holes: it can only give
    back the top of its heap by itself) until `release_freed_memory`, which every stage calls as it ends."""
    import threading

    from mergeflow.buffers import release_freed_memory

    def rss() -> int:
        return int(open("/proc/self/statm").read().split()[1]) * 4096

    alive = []

    def work():  # 64 KB tensors (below malloc's mmap threshold: from the heap), every other one freed: 256 MB of holes
        tensors = [torch.ones(16_384) for _ in range(8_192)]
        alive.extend(tensors[1::2])

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    before = rss()
    release_freed_memory()
    assert before - rss() > 150e6
    alive.clear()
