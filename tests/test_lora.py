"""PEFT LoRA adapters as experts: made by `peft` itself on tiny models, read as W0 + scale * B @ A one tensor at a
time, merged by every data-free method beside full checkpoints, refused with the file and tensor named when they
do not fit the base."""

from __future__ import annotations

import json

import mergeflow  # noqa: F401  (the torchvision fix before peft imports transformers)
import pytest
import torch
from safetensors.torch import load_file, save_file

from factories import fit_experts
from mergeflow.checkpoints import open_checkpoint
from mergeflow.checkpoints.adapter import is_adapter, open_adapter
from mergeflow.errors import CheckpointError
from mergeflow.merge import merge_checkpoints
from mergeflow.methods import METHODS, method_class
from mergeflow.methods.data_aware import DataAwareMethod

peft = pytest.importorskip("peft")
SUBSPACE_METHODS = {"tsv", "iso_c", "iso_cts", "doge_ta"}
transformers = pytest.importorskip("transformers")


def _bert(cls_name: str = "BertModel"):
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(config).eval()


def _gpt2():
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    torch.manual_seed(0)
    return transformers.GPT2Model(config).eval()


def _save_state(model, path):
    save_file({k: v.contiguous().clone() for k, v in model.state_dict().items()}, str(path))


def _adapter(make_model, lora_config, directory, seed):
    """A LoRA adapter made by peft (B randomised: peft starts it at zero) and the full weights peft merges from it."""
    model = peft.get_peft_model(make_model(), lora_config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(str(directory))
    merged = model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-bert")
    _save_state(_bert(), root / "base.safetensors")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])
    full = [_adapter(_bert, config, root / f"adapter{i}", seed=i) for i in range(2)]
    return root, full


def test_an_adapter_reads_as_peft_merges_it(bert):
    root, full = bert
    assert is_adapter(str(root / "adapter0")) and not is_adapter(str(root / "base.safetensors"))
    with open_checkpoint(str(root / "base.safetensors")) as base, open_adapter(str(root / "adapter0"), base) as lora:
        assert lora.keys() == base.keys() and len(lora.lora) == 4  # query and value of two layers
        for name in base.keys():
            assert torch.allclose(lora.get(name), full[0][name], atol=1e-6), name
        name = "encoder.layer.1.attention.self.value.weight"
        w0 = base.get(name)
        assert torch.allclose(lora.task_vector(name, w0), full[0][name] - w0, atol=1e-6)
        assert torch.allclose(lora.task_vector(name, w0[3:9], rows=(3, 9)), (full[0][name] - w0)[3:9], atol=1e-6)
        assert not lora.task_vector("encoder.layer.0.output.dense.weight", base.get(
            "encoder.layer.0.output.dense.weight")).any()  # not a target: a zero task vector


@pytest.mark.parametrize("method", sorted(m for m in METHODS if not issubclass(method_class(m), DataAwareMethod)
                                          and not method_class(m).needs_objective))
def test_every_data_free_method_merges_adapters_beside_a_full_checkpoint(bert, tmp_path, method):
    root, full = bert
    save_file(full[1], str(tmp_path / "full1.safetensors"))
    params = {"steps": 20} if method in ("wudi", "doge_ta") else {}
    mixed = merge_checkpoints(method, str(root / "base.safetensors"),
                              fit_experts(method, [str(root / "adapter0"), str(tmp_path / "full1.safetensors")]),
                              str(tmp_path / "mixed"), params, device="cpu")
    save_file(full[0], str(tmp_path / "full0.safetensors"))
    merge_checkpoints(method, str(root / "base.safetensors"),
                      fit_experts(method, [str(tmp_path / "full0.safetensors"), str(tmp_path / "full1.safetensors")]),
                      str(tmp_path / "dense"), params, device="cpu")
    a, b = load_file(str(tmp_path / "mixed" / "model.safetensors")), load_file(str(tmp_path / "dense" / "model.safetensors"))
    base = load_file(str(root / "base.safetensors"))
    assert set(a) == set(b) == set(base)
    assert all(bool(torch.isfinite(a[n]).all()) for n in a if a[n].is_floating_point())
    if method in SUBSPACE_METHODS:
        # a LoRA task vector is exactly low-rank: these methods' SVDs then reach into its null space, whose basis is
        # arbitrary (and whose fp32 rounding noise the dense checkpoint's (W0 + delta) - W0 fills): the two merges
        # legitimately differ (README, "LoRA experts")
        return
    # the adapter's task vector is scale * B @ A exactly, the full checkpoint's (W0 + delta) - W0 carries fp32
    # rounding: equal up to that
    diff = sum(float((a[n].double() - b[n].double()).norm() ** 2) for n in a if a[n].is_floating_point()) ** 0.5
    update = sum(float((b[n].double() - base[n].double()).norm() ** 2) for n in b if b[n].is_floating_point()) ** 0.5
    assert diff <= 1e-5 * update, (method, diff / update)
    adapter_input = next(i for i in mixed.inputs if i.uri.endswith("adapter0"))
    assert adapter_input.role == "expert" and len(adapter_input.sha256) == 64


def test_fan_in_fan_out_rslora_and_alpha_pattern(tmp_path):
    _save_state(_gpt2(), tmp_path / "base.safetensors")
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True, use_rslora=True,
                             alpha_pattern={"h.1.attn.c_attn": 4})
    full = _adapter(_gpt2, config, tmp_path / "adapter", seed=3)
    with open_checkpoint(str(tmp_path / "base.safetensors")) as base, \
            open_adapter(str(tmp_path / "adapter"), base) as lora:
        assert {k: v[2] for k, v in lora.lora.items()} == {"h.0.attn.c_attn.weight": 8.0,
                                                           "h.1.attn.c_attn.weight": 2.0}
        for name in base.keys():
            assert torch.allclose(lora.get(name), full[name], atol=1e-6), name
        for name in lora.lora:  # rows of (B @ A)^T: columns of A
            assert torch.allclose(lora.delta(name, rows=(2, 7)), lora.delta(name)[2:7], atol=1e-6), name


def test_adapters_merge_in_blocks_of_rows_as_a_whole(bert, tmp_path):
    root, full = bert
    save_file(full[1], str(tmp_path / "full1.safetensors"))
    experts = [str(root / "adapter0"), str(tmp_path / "full1.safetensors")]
    merge_checkpoints("ties", str(root / "base.safetensors"), experts, str(tmp_path / "whole"), device="cpu")
    merge_checkpoints("ties", str(root / "base.safetensors"), experts, str(tmp_path / "blocks"), device="cpu",
                      window=4096)  # a few rows at a time
    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(tmp_path / "blocks" / "model.safetensors"))
    # a block's delta is B[rows] @ A: the whole product's rows up to the fp32 rounding of another matmul shape
    assert all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7) for k in a)
    assert sum(not torch.equal(a[k], b[k]) for k in a) <= 4  # at most the 4 LoRA targets


def test_a_task_model_adapter_over_a_bare_encoder_and_modules_to_save(tmp_path):
    # trained on BertForSequenceClassification (bert.encoder...), merged over the bare encoder (encoder...)
    _save_state(_bert(), tmp_path / "encoder.safetensors")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query"])
    full = _adapter(lambda: _bert("BertForSequenceClassification"), config, tmp_path / "task-adapter", seed=5)
    with open_checkpoint(str(tmp_path / "encoder.safetensors")) as base, \
            open_adapter(str(tmp_path / "task-adapter"), base) as lora:
        name = "encoder.layer.0.attention.self.query.weight"
        assert torch.allclose(lora.get(name), full["bert." + name], atol=1e-6)
    # the task model as base, with its classifier saved whole by the adapter
    _save_state(_bert("BertForSequenceClassification"), tmp_path / "task.safetensors")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query"], modules_to_save=["classifier"])
    full = _adapter(lambda: _bert("BertForSequenceClassification"), config, tmp_path / "saved", seed=6)
    with open_checkpoint(str(tmp_path / "task.safetensors")) as base, \
            open_adapter(str(tmp_path / "saved"), base) as lora:
        assert "classifier.weight" in lora.whole
        for name in base.keys():
            assert torch.allclose(lora.get(name), full[name], atol=1e-6), name


def test_an_adapter_that_does_not_fit_the_base_is_named(bert, tmp_path):
    root, _ = bert
    weights = load_file(str(root / "adapter0" / "adapter_model.safetensors"))
    config = json.loads((root / "adapter0" / "adapter_config.json").read_text())

    def variant(name, tensors, cfg=config):
        directory = tmp_path / name
        directory.mkdir()
        save_file(tensors, str(directory / "adapter_model.safetensors"))
        (directory / "adapter_config.json").write_text(json.dumps(cfg))
        return str(directory)

    key = next(k for k in weights if k.endswith("query.lora_A.weight"))
    stray = variant("stray", {**weights, key.replace("query", "nowhere"): weights[key].clone(),
                              key.replace("query", "nowhere").replace("lora_A", "lora_B"): weights[key].T.contiguous()})
    wrong = variant("wrong", {**weights, key: torch.zeros(4, 7)})
    dora = variant("dora", weights, {**config, "use_dora": True})
    with open_checkpoint(str(root / "base.safetensors")) as base:
        with pytest.raises(CheckpointError, match="nowhere") as error:
            open_adapter(stray, base)
        assert "adapter_model.safetensors" in str(error.value)
        with pytest.raises(CheckpointError, match="does not give the base"):
            open_adapter(wrong, base)
        with pytest.raises(CheckpointError, match="DoRA"):
            open_adapter(dora, base)
    with pytest.raises(CheckpointError, match="nowhere"):  # refused by the merge before any work, nothing written
        merge_checkpoints("task_arithmetic", str(root / "base.safetensors"), [stray], str(tmp_path / "out"),
                          device="cpu")
    assert not (tmp_path / "out").exists()


def test_a_linear_merge_of_adapters_is_written_as_an_adapter_exactly(tmp_path):
    from mergeflow.checkpoints.lora import merge_adapters
    from mergeflow.errors import ConfigError

    _save_state(_bert(), tmp_path / "base.safetensors")
    configs = [peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]),
               peft.LoraConfig(r=2, lora_alpha=2, use_rslora=True, target_modules=["query", "word_embeddings"])]
    for i, config in enumerate(configs):
        _adapter(_bert, config, tmp_path / f"a{i}", seed=20 + i)
    experts = [str(tmp_path / "a0"), str(tmp_path / "a1")]
    record = merge_adapters("task_arithmetic", {"scaling": 0.7}, str(tmp_path / "base.safetensors"), experts,
                            str(tmp_path / "merged-adapter"))
    assert record["ranks"]["encoder.layer.0.attention.self.query"] == 6  # 4 + 2: both adapters target it
    assert record["ranks"]["embeddings.word_embeddings"] == 2
    dense = merge_checkpoints("task_arithmetic", str(tmp_path / "base.safetensors"), experts,
                              str(tmp_path / "dense"), {"scaling": 0.7}, device="cpu")
    assert dense.method == "task_arithmetic"
    expected = load_file(str(tmp_path / "dense" / "model.safetensors"))
    loaded = peft.PeftModel.from_pretrained(_bert(), str(tmp_path / "merged-adapter")).merge_and_unload()
    for name, tensor in loaded.state_dict().items():
        assert torch.allclose(tensor, expected[name], atol=1e-5), name
    with pytest.raises(ConfigError, match="not linear"):
        merge_adapters("ties", {}, str(tmp_path / "base.safetensors"), experts, str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="not a LoRA adapter"):
        merge_adapters("average", {}, str(tmp_path / "base.safetensors"), [experts[0], str(tmp_path / "base.safetensors")],
                       str(tmp_path / "y"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_merges_adapters_into_an_adapter(bert, tmp_path):
    from mergeflow_app.cli import main

    root, _ = bert
    out = tmp_path / "cli-adapter"
    assert main(["merge", "--method", "average", "--base", str(root / "base.safetensors"), "--expert",
                 str(root / "adapter0"), "--expert", str(root / "adapter1"), "--out", str(out), "--as-adapter"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 8 and sorted(config["target_modules"]) == ["query", "value"]
    with open_checkpoint(str(root / "base.safetensors")) as base, open_adapter(str(out), base) as merged:
        assert set(merged.lora) == {f"encoder.layer.{i}.attention.self.{m}.weight" for i in (0, 1)
                                    for m in ("query", "value")}
