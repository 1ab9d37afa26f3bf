"""A merge split into layer-group parts (separate tasks in the flow) and assembled equals the one-piece merge
tensor for tensor, and the assembled model is a valid sharded checkpoint with one manifest."""

from __future__ import annotations

import json

import pytest
import torch

from mergeflow.checkpoints import open_checkpoint
from mergeflow.checkpoints.reader import TensorInfo
from mergeflow.merge import assemble_parts, merge_checkpoints, plan_parts


def test_plan_parts_is_contiguous_balanced_and_never_empty():
    infos = [TensorInfo(f"t{i}", (100 * (i + 1),), torch.float32) for i in range(6)]
    parts = plan_parts(infos, 3)
    assert [n for part in parts for n in part] == [i.name for i in infos] and len(parts) == 3
    assert all(parts) and plan_parts(infos[:2], 5) == [["t0"], ["t1"]]
    assert plan_parts(infos, 1) == [[i.name for i in infos]]


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.3}), ("doge_ta", {"steps": 5}),
                                           ("task_arithmetic", {})])
def test_parts_assemble_to_the_one_piece_merge(tmp_path, cache, model_files, method, params):
    base, experts, _, _ = model_files
    whole = merge_checkpoints(method, base, experts, str(tmp_path / "whole"), params, cache=cache)
    parts = [str(tmp_path / f"part{i}") for i in range(3)]
    for i, out in enumerate(parts):
        merge_checkpoints(method, base, experts, out, params, cache=cache, state=whole.state, part=(i, 3))
    result = assemble_parts(parts, str(tmp_path / "joined"), cache=cache)
    with open_checkpoint(str(tmp_path / "whole"), cache=cache) as a, open_checkpoint(str(tmp_path / "joined"),
                                                                                    cache=cache) as b:
        assert a.keys() == b.keys()
        for key in a.keys():
            assert torch.equal(a.get(key), b.get(key)), key
    manifest = json.loads((tmp_path / "joined" / "mergeflow.json").read_text())
    assert manifest["method"] == method and len([f for f in manifest["files"] if f.startswith("model-")]) == 3
    assert result.inputs == whole.inputs


def test_assembly_refuses_a_tampered_part(tmp_path, cache, model_files):
    base, experts, _, _ = model_files
    parts = [str(tmp_path / f"part{i}") for i in range(2)]
    for i, out in enumerate(parts):
        merge_checkpoints("task_arithmetic", base, experts, out, cache=cache, part=(i, 2))
    shard = next((tmp_path / "part1").glob("model-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    from mergeflow.errors import IntegrityError

    with pytest.raises(IntegrityError, match="does not match its manifest"):
        assemble_parts(parts, str(tmp_path / "joined"), cache=cache)
    assert not (tmp_path / "joined").exists()


def test_expert_names_come_from_the_folder_of_a_model_file_or_a_stored_adapter():
    from mergeflow.merge import expert_name

    assert expert_name("s3://b/experts/sst2-1a2b/model.safetensors") == "sst2-1a2b"
    assert expert_name("/s/experts/qa-9f/adapter") == "qa-9f"  # the LoRA stage's adapter folder
    assert expert_name("/s/experts/qa-9f/adapter/") == "qa-9f"
    assert expert_name("/runs/my-lora") == "my-lora"
    assert expert_name("/m/expert_b.safetensors") == "expert_b"
