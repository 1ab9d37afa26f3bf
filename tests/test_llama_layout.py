"""A Llama-shaped causal LM in the Hugging Face sharded layout (index + shards, bf16, grouped-query attention, tied
and untied embeddings) merges with every data-free method into a sharded bf16 model with its index and the base's
config, which `AutoModelForCausalLM.from_pretrained` loads and runs."""

from __future__ import annotations

import json

import mergeflow  # noqa: F401  (the torchvision fix before transformers)
import pytest
import torch
from safetensors.torch import load_file

from factories import fit_experts
from mergeflow.merge import merge_checkpoints
from mergeflow.methods import METHODS, method_class
from mergeflow.methods.data_aware import DataAwareMethod

transformers = pytest.importorskip("transformers")
DATA_FREE = sorted(m for m in METHODS if not issubclass(method_class(m), DataAwareMethod)
                   and not method_class(m).needs_objective)
FAST = {"wudi": {"steps": 10}, "doge_ta": {"steps": 10}}


def _llama(tied: bool, seed: int):
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=tied)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def llama(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    base = _llama(request.param, 0)
    base.save_pretrained(str(root / "base"), max_shard_size="100KB")
    experts = []
    for i in range(2):
        expert = _llama(request.param, 0)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(i + 1)
            for param in expert.parameters():
                param.add_((0.02 * torch.randn(param.shape, generator=generator)).to(param.dtype))
        expert.save_pretrained(str(root / f"expert{i}"), max_shard_size="100KB")
        experts.append(str(root / f"expert{i}"))
    assert len(list((root / "base").glob("model-*.safetensors"))) > 1  # really sharded
    return root, str(root / "base"), experts, request.param


@pytest.mark.parametrize("method", DATA_FREE)
def test_every_data_free_method_gives_a_loadable_sharded_bf16_model(llama, tmp_path, method):
    root, base, experts, tied = llama
    out = tmp_path / "merged"
    merge_checkpoints(method, base, fit_experts(method, experts), str(out), FAST.get(method, {}), device="cpu",
                      shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    assert ("lm_head.weight" in index["weight_map"]) != tied  # a tied head is not stored, as in the base
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.dtype == torch.bfloat16
    assert model.config.num_key_value_heads == 2 and model.config.tie_word_embeddings == tied
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 3]])).logits
    assert logits.shape == (1, 4, 128) and bool(torch.isfinite(logits).all())


def test_task_arithmetic_on_shards_matches_the_formula(llama, tmp_path):
    root, base, experts, _ = llama
    merge_checkpoints("task_arithmetic", base, experts, str(tmp_path / "ta"), {"scaling": 0.5}, device="cpu")
    merged = {k: v for f in (tmp_path / "ta").glob("*.safetensors") for k, v in load_file(str(f)).items()}

    def state(directory):
        return {k: v for f in sorted((root / directory).glob("*.safetensors")) for k, v in load_file(str(f)).items()}

    theta0, taus = state("base"), [state("expert0"), state("expert1")]
    for name, tensor in merged.items():
        expected = theta0[name].float() + 0.5 * sum(t[name].float() - theta0[name].float() for t in taus)
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, expected.to(torch.bfloat16)), name
