"""The sparsify stage: a method's global pass stored once as safetensors, reused across scalings, read back
exactly and verified by digest where a merge reads it."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors import safe_open

from mergeflow.checkpoints import open_checkpoint
from mergeflow.config import MergeSpec
from mergeflow.errors import IntegrityError
from mergeflow.stages.merge import merge_experts
from mergeflow.stages.sparsify import STATE_FILE, read_state, sparsify, write_state


def _tensors(ref_uri: str) -> dict:
    directory = Path(ref_uri)
    files = sorted(directory.glob("*.safetensors"))
    out = {}
    for f in files:
        ckpt = open_checkpoint(str(f))
        out.update({k: ckpt.get(k) for k in ckpt.keys()})
    return out


def test_state_round_trips_exactly(tmp_path):
    state = {"thresholds": [0.1, 1 / 3, 2.0 ** -140, 7], "majority_sign": -1, "selected": ["a.weight", "b.weight"]}
    write_state(state, tmp_path / "s.safetensors", {"method": "ties", "params": {"density": 0.2}})
    assert read_state(tmp_path / "s.safetensors") == state
    with safe_open(str(tmp_path / "s.safetensors"), framework="pt") as handle:
        assert list(handle.keys()) == ["thresholds"] and handle.metadata()["method"] == '"ties"'


@pytest.mark.parametrize("method, first, second", [
    ("ties", {"density": 0.3, "scaling": 0.5}, {"density": 0.3, "scaling": 0.9}),
    ("doge_ta", {"keep": 0.4, "eta": 0.3, "steps": 3}, {"keep": 0.4, "eta": 0.5, "steps": 3}),
])
def test_stage_is_stored_once_per_pass_and_merges_as_the_whole_merge_does(store_and_refs, method, first, second):
    store, base, experts = store_and_refs
    ref, reused = sparsify(MergeSpec(method=method, params=first), base, experts, store, "cpu")
    assert not reused and (Path(ref.uri) / STATE_FILE).is_file() and [p.name for p in Path(ref.uri).iterdir()] == [
        STATE_FILE]
    again, reused = sparsify(MergeSpec(method=method, params=second), base, experts, store, "cpu")
    assert reused and again == ref  # another scaling / eta reads the same pass
    spec = MergeSpec(method=method, params=second)
    with_state, _ = merge_experts(spec, base, experts, store.root + "/merged/a", store, state=ref, device="cpu")
    whole, _ = merge_experts(spec, base, experts, store.root + "/merged/b", store, device="cpu")
    a, b = _tensors(with_state.uri), _tensors(whole.uri)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_a_state_changed_after_its_reference_is_refused(store_and_refs):
    store, base, experts = store_and_refs
    ref, _ = sparsify(MergeSpec(method="ties"), base, experts, store, "cpu")
    path = Path(ref.uri) / STATE_FILE
    state = read_state(path)
    write_state({**state, "thresholds": [t * 0.5 for t in state["thresholds"]]}, path, {})
    with pytest.raises(IntegrityError, match="sparsify"):
        merge_experts(MergeSpec(method="ties"), base, experts, store.root + "/merged/t", store, state=ref,
                      device="cpu")
    assert not Path(store.root, "merged", "t").exists()
