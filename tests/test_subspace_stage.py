"""The subspace stage: per-layer factors computed once per expert set, stored sharded, verified by digest where
they are read, and read by every merge and sweep point of the subspace methods instead of a new SVD."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from factories import make_experts, tiny_state_dict
from mergeflow.checkpoints import StateDictSource, open_checkpoint
from mergeflow.config import MergeSpec
from mergeflow.errors import IntegrityError
from mergeflow.merge import merge_pool
from mergeflow.methods import build_method
from mergeflow.stages.merge import merge_experts
from mergeflow.stages.subspace import build_subspace, subspace_kinds
from mergeflow.subspace import SubspaceReader, write_subspace
from mergeflow.sweep import merged_point, scaled_update
from mergeflow.task_vectors import ExpertPool

METHODS = [("tsv", {}), ("iso_c", {}), ("iso_cts", {}), ("doge_ta", {"steps": 5})]


def _pool(base, experts, subspaces=None) -> ExpertPool:
    return ExpertPool(StateDictSource(base), [StateDictSource(e) for e in experts], [f"e{i}" for i in range(len(experts))],
                      subspaces=subspaces)


@pytest.fixture
def models():
    base = tiny_state_dict()
    return base, make_experts(base, 3)


@pytest.fixture
def stored(tmp_path, models):
    """kind -> SubspaceReader of every kind the four methods read, written in small files (several per kind)."""
    base, experts = models
    readers = {}
    for kind in ("task", "sum", "shared-6", "cts-0.8"):
        directory = tmp_path / kind
        directory.mkdir()
        index = write_subspace(_pool(base, experts), kind, directory, group_bytes=1)
        assert len(set(index["layers"].values())) == len(index["layers"]) > 1  # one file per layer group
        readers[kind] = SubspaceReader(directory, ["e0", "e1", "e2"])
    return readers


class SvdCounter:
    """Counts torch.linalg.eigh / svd and scipy.linalg.eigh calls (every SVD-like factorisation the methods make)."""

    def __init__(self, monkeypatch):
        import scipy.linalg

        self.calls = 0
        for module, name in ((torch.linalg, "eigh"), (torch.linalg, "svd"), (scipy.linalg, "eigh")):
            original = getattr(module, name)

            def counted(*args, _original=original, **kwargs):
                self.calls += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(module, name, counted)


@pytest.mark.parametrize("method, params", METHODS)
def test_stored_factors_give_the_same_merge(models, stored, method, params):
    base, experts = models
    merger = build_method(method, params)
    plain, with_stored = {}, {}
    merge_pool(merger, _pool(base, experts), plain.__setitem__)
    merge_pool(merger, _pool(base, experts, {k: stored[k] for k in merger.subspace_kinds()}), with_stored.__setitem__)
    for name in plain:
        assert torch.equal(plain[name], with_stored[name]), name


def test_a_doge_eta_sweep_on_the_stored_subspace_makes_no_svd(models, stored, monkeypatch):
    base, experts = models
    counter = SvdCounter(monkeypatch)
    for eta in (0.03, 0.07, 0.15):
        merged_point("doge_ta", {"eta": eta, "steps": 3}, None, None, _pool(base, experts, {"shared-6": stored["shared-6"]}))
    assert counter.calls == 0
    merged_point("doge_ta", {"eta": 0.3, "steps": 3}, None, None, _pool(base, experts))  # the counter counts
    assert counter.calls > 0


@pytest.mark.parametrize("method, kind", [("tsv", "task"), ("iso_c", "sum"), ("iso_cts", "cts-0.8")])
def test_an_alpha_sweep_computes_one_update_and_no_task_svd(models, stored, monkeypatch, method, kind):
    base, experts = models
    matrices = sum(t.dim() == 2 and t.is_floating_point() for t in base.values())
    counter = SvdCounter(monkeypatch)
    update = dict(scaled_update(method, {}, _pool(base, experts, {kind: stored[kind]})))
    for alpha in (0.5, 1.0, 1.5):
        merged_point(method, {"alpha": alpha}, base, lambda: update, None)
    # what is left per matrix is the method's own orthogonalisation: TSV's and Iso-CTS's two polar factors (the
    # stage stored Iso-CTS's task-specific residual triplets too); Iso-C reads everything
    per_matrix = {"tsv": 2, "iso_c": 0, "iso_cts": 2}[method]
    assert counter.calls == per_matrix * matrices


def test_reader_refuses_other_experts(stored):
    with pytest.raises(ValueError, match="other experts"):
        SubspaceReader(stored["task"].directory, ["e1", "e0", "e2"])


def test_kinds_follow_the_methods_and_their_grids():
    specs = [MergeSpec(method="task_arithmetic"), MergeSpec(method="iso_c"), MergeSpec(method="iso_cts"),
             MergeSpec(method="doge_ta", sweep={"subspace_divisor": [4, 6]}), MergeSpec(method="tsv")]
    assert subspace_kinds(specs) == ["sum", "cts-0.8", "shared-4", "shared-6", "task"]
    iso_cts_grid = [MergeSpec(method="iso_cts", sweep={"common_space_fraction": [0.5, 0.8]})]
    assert subspace_kinds(iso_cts_grid) == ["cts-0.5", "cts-0.8"]
    assert subspace_kinds([MergeSpec(method="ties")]) == []


def test_stage_stores_once_and_the_merge_reads_it_verified(store_and_refs, monkeypatch):
    store, base, experts = store_and_refs
    ref, reused, report = build_subspace("task", base, experts, store, "cpu")
    assert not reused and report["bytes"] > 0 and ref.uri.startswith(store.root + "/subspace/task-")
    again, reused, _ = build_subspace("task", base, experts, store, "cpu")
    assert reused and again == ref
    counter = SvdCounter(monkeypatch)
    out, record = merge_experts(MergeSpec(method="tsv"), base, experts, store.root + "/merged/tsv", store,
                                device="cpu", subspaces={"task": ref})
    matrices = len(json.loads((Path(ref.uri) / "index.json").read_text())["layers"])
    assert counter.calls == 2 * matrices  # the polar factors only
    assert record["method"] == "tsv"
    # a subspace whose content changed after it was referenced is refused where the merge reads it
    directory = Path(ref.uri)
    victim = sorted(directory.glob("factors-*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(IntegrityError, match="subspace"):
        merge_experts(MergeSpec(method="tsv", params={"alpha": 0.5}), base, experts, store.root + "/merged/tsv2", store,
                      device="cpu", subspaces={"task": ref})


def test_a_merge_part_fetches_and_verifies_only_the_factor_files_of_its_layers(store_and_refs, monkeypatch):
    from mergeflow.merge import plan_parts
    from mergeflow.stages.merge import merge_part
    from mergeflow.stages.store import Store
    from mergeflow.storage import sha256_file

    store, base, experts = store_and_refs
    ref, _, _ = build_subspace("task", base, experts, store, "cpu", group_bytes=1)  # a file per layer
    index = json.loads((Path(ref.uri) / "index.json").read_text())
    assert ref.sha256 == sha256_file(Path(ref.uri) / "index.json")  # the index records every file's digest
    fetched = []
    original = Store.fetch
    monkeypatch.setattr(Store, "fetch", lambda self, uri, expected_sha256=None: (
        fetched.append(uri), original(self, uri, expected_sha256))[1])
    base_ckpt = open_checkpoint(str(Path(base.uri) / "model.safetensors"))
    part = plan_parts([base_ckpt.info(k) for k in base_ckpt.keys()], 2)[0]
    merge_part(MergeSpec(method="tsv"), base, experts, store.root + "/merged/tsv", 0, 2, store,
               device="cpu", subspaces={"task": ref})
    read = {uri.rsplit("/", 1)[1] for uri in fetched if uri.startswith(ref.uri + "/factors-")}
    mine = {index["layers"][name] for name in part if name in index["layers"]}
    assert read == mine and 0 < len(read) < len(index["files"])


def test_merge_refuses_an_expert_changed_after_its_reference(store_and_refs):
    store, base, experts = store_and_refs
    path = Path(experts["e1"].uri)
    tensors = tiny_state_dict(seed=9)
    save_file(tensors, str(path))
    with pytest.raises(IntegrityError, match="e1.safetensors"):
        merge_experts(MergeSpec(method="task_arithmetic"), base, experts, store.root + "/merged/ta", store,
                      device="cpu")
    assert not Path(store.root, "merged", "ta").exists()


def test_doge_am_reads_its_shared_basis_from_the_stage(tmp_path, models, monkeypatch):
    """`shared-tasks` (the r/N basis, N the number of experts): a DOGE AM merge on the stored factors equals the one
    computing its own, and makes no SVD."""
    base, experts = models
    directory = tmp_path / "shared-tasks"
    directory.mkdir()
    write_subspace(_pool(base, experts), "shared-tasks", directory, group_bytes=1)
    reader = SubspaceReader(directory, ["e0", "e1", "e2"])
    target = {k: v for k, v in experts[0].items()}

    def objective(merged, step):
        return sum(((merged[k] - target[k]) ** 2).sum() for k in merged)

    merger = build_method("doge_am", {"steps": 5, "am_steps": 3})
    assert merger.subspace_kinds() == ("shared-tasks",)
    plain, with_stored = {}, {}
    pool = _pool(base, experts)
    pool.objective = objective
    merge_pool(merger, pool, plain.__setitem__)
    counter = SvdCounter(monkeypatch)
    pool = _pool(base, experts, {"shared-tasks": reader})
    pool.objective = objective
    merge_pool(build_method("doge_am", {"steps": 5, "am_steps": 3}), pool, with_stored.__setitem__)
    assert counter.calls == 0
    for name in plain:
        assert torch.equal(plain[name], with_stored[name]), name
