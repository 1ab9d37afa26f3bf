"""The streaming engine: same result as the in-memory path, sharded in and out, provenance, atomic output,
and every bad input rejected before compute with an error naming file and tensor, with nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from factories import fit_experts
from mergeflow.checkpoints import open_checkpoint
from mergeflow.errors import CheckpointError, ConfigError, UnsafeCheckpointError
from mergeflow.merge import MANIFEST, merge_checkpoints, merge_state_dicts
from mergeflow.methods import METHODS
from mergeflow.methods.data_aware import DataAwareMethod
from mergeflow.storage import sha256_file


def _read_all(uri, cache):
    ckpt = open_checkpoint(uri, cache=cache)
    return {k: ckpt.get(k) for k in ckpt.keys()}, ckpt


@pytest.mark.parametrize("method", sorted(m for m, cls in METHODS.items()
                                           if not issubclass(cls, DataAwareMethod) and not cls.needs_objective))
def test_streaming_equals_in_memory_with_sharded_output(tmp_path, cache, model_files, method):
    base_path, expert_paths, base, experts = model_files
    expert_paths, experts = fit_experts(method, expert_paths), fit_experts(method, experts)
    out = tmp_path / f"merged-{method}"
    result = merge_checkpoints(method, base_path, expert_paths, str(out), shard_size=500, cache=cache)
    streamed, ckpt = _read_all(str(out), cache)
    in_memory = merge_state_dicts(method, base, experts)
    assert streamed.keys() == in_memory.keys()
    assert all(torch.equal(streamed[k], in_memory[k]) for k in streamed)
    assert len([f for f in result.files if f.endswith(".safetensors")]) > 1
    assert all(sha256_file(out / name) == digest for name, digest in result.files.items())
    meta = ckpt.metadata
    assert meta["merge_method"] == method and meta["mergeflow_version"]
    inputs = json.loads(meta["inputs"])
    assert [i["role"] for i in inputs] == ["base"] + ["expert"] * len(expert_paths)
    assert inputs[1]["sha256"] == sha256_file(expert_paths[0]) and inputs[1]["uri"] == expert_paths[0]
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["method"] == method and manifest["files"] == result.files


def test_sharded_inputs_and_file_urls(tmp_path, cache, model_files):
    base_path, expert_paths, base, experts = model_files
    resharded = []
    for i, path in enumerate(expert_paths):  # re-write each expert in the HF sharded layout
        merge_checkpoints("average", path, [path], str(tmp_path / f"sharded{i}"), shard_size=300, cache=cache)
        resharded.append(f"file://{tmp_path}/sharded{i}/model.safetensors.index.json")
    merge_checkpoints("ties", f"file://{base_path}", resharded, str(tmp_path / "out"), cache=cache)
    got, _ = _read_all(str(tmp_path / "out"), cache)
    expected = merge_state_dicts("ties", base, experts)
    assert all(torch.equal(got[k], expected[k]) for k in got)


def test_precomputed_state_is_used_instead_of_prepare(tmp_path, cache, model_files):
    """A given state replaces prepare(): the same state gives the same files, and a state computed for another
    density gives that density's merge, not the one the params would prepare."""
    base_path, expert_paths, base, experts = model_files
    first = merge_checkpoints("ties", base_path, expert_paths, str(tmp_path / "a"), cache=cache)
    second = merge_checkpoints("ties", base_path, expert_paths, str(tmp_path / "b"), cache=cache, state=first.state)
    assert first.files == second.files
    dense = merge_checkpoints("ties", base_path, expert_paths, str(tmp_path / "dense"), {"density": 0.9},
                              cache=cache)
    assert dense.state["thresholds"] != first.state["thresholds"]
    given = merge_checkpoints("ties", base_path, expert_paths, str(tmp_path / "given"), cache=cache,
                              state=dense.state)  # default density 0.2, state of density 0.9
    got, _ = _read_all(str(tmp_path / "given"), cache)
    expected = merge_state_dicts("ties", base, experts, {"density": 0.9})
    assert all(torch.equal(got[k], expected[k]) for k in got)
    assert given.files != first.files


def test_existing_output_is_not_overwritten_unless_asked(tmp_path, cache, model_files):
    base_path, expert_paths, _, _ = model_files
    out = str(tmp_path / "out")
    merge_checkpoints("average", base_path, expert_paths, out, cache=cache)
    with pytest.raises(FileExistsError):
        merge_checkpoints("task_arithmetic", base_path, expert_paths, out, cache=cache)
    merge_checkpoints("task_arithmetic", base_path, expert_paths, out, cache=cache, overwrite=True)
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["method"] == "task_arithmetic"


def _assert_nothing_written(tmp_path):
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]
    assert leftovers == []


def _bad_expert(tmp_path, base, change):
    sd = {k: v.clone() for k, v in base.items()}
    change(sd)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    return str(path)


@pytest.mark.parametrize("change,match,tensor", [
    (lambda sd: sd.pop("encoder.layer.0.mlp.fc2.weight"), "missing", "encoder.layer.0.mlp.fc2.weight"),
    (lambda sd: sd.__setitem__("extra.weight", torch.zeros(2)), "lacks", "extra.weight"),
    (lambda sd: sd.__setitem__("encoder.layer.0.mlp.fc1.bias", torch.zeros(17)), "shape",
     "encoder.layer.0.mlp.fc1.bias"),
    (lambda sd: sd.__setitem__("encoder.layer.0.ln_1.weight", torch.ones(8, dtype=torch.float16)), "dtype",
     "encoder.layer.0.ln_1.weight"),
    (lambda sd: sd["encoder.layer.0.attn.out_proj.weight"].__setitem__((0, 0), float("nan")), "NaN",
     "encoder.layer.0.attn.out_proj.weight"),
    (lambda sd: sd["encoder.layer.0.mlp.fc1.weight"].__setitem__((1, 1), float("inf")), "Inf",
     "encoder.layer.0.mlp.fc1.weight"),
])
def test_bad_expert_names_file_and_tensor_and_writes_nothing(tmp_path, cache, model_files, change, match, tensor):
    base_path, expert_paths, base, _ = model_files
    bad = _bad_expert(tmp_path, base, change)
    with pytest.raises(CheckpointError, match=match) as info:
        merge_checkpoints("ties", base_path, [expert_paths[0], bad], str(tmp_path / "out"), cache=cache)
    assert info.value.file == bad and info.value.tensor == tensor
    _assert_nothing_written(tmp_path)


def test_truncated_missing_and_pickled_inputs_write_nothing(tmp_path, cache, model_files):
    base_path, expert_paths, _, _ = model_files
    data = open(expert_paths[1], "rb").read()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    cases = [(str(tmp_path / "cut.safetensors"), CheckpointError, "truncated"),
             (str(tmp_path / "absent.safetensors"), CheckpointError, "not found"),
             (str(tmp_path / "module.pt"), UnsafeCheckpointError, "mergeflow convert")]
    for path, error, match in cases:
        with pytest.raises(error, match=match):
            merge_checkpoints("average", base_path, [expert_paths[0], path], str(tmp_path / "out"), cache=cache)
        _assert_nothing_written(tmp_path)


def test_unknown_method_or_parameter_fails_before_reading_anything(tmp_path, cache):
    missing = str(tmp_path / "does-not-exist.safetensors")
    with pytest.raises(ConfigError, match="unknown merge method"):
        merge_checkpoints("magic", missing, [missing], str(tmp_path / "out"), cache=cache)
    with pytest.raises(ConfigError, match="scale"):
        merge_checkpoints("task_arithmetic", missing, [missing], str(tmp_path / "out"), {"scale": 1}, cache=cache)
    _assert_nothing_written(tmp_path)


def test_failure_midway_leaves_no_partial_output(tmp_path, cache, model_files, monkeypatch):
    base_path, expert_paths, _, _ = model_files
    from mergeflow.methods.task_arithmetic import TaskArithmetic

    calls = {"n": 0}
    original = TaskArithmetic.merge_tensor

    def failing(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash in the middle of the merge")
        return original(self, *args)

    monkeypatch.setattr(TaskArithmetic, "merge_tensor", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        merge_checkpoints("task_arithmetic", base_path, expert_paths, str(tmp_path / "out"), cache=cache)
    _assert_nothing_written(tmp_path)
