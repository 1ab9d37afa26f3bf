"""Seeded Llama-shaped causal LMs for the benchmarks: Hugging Face key names and sharded layout (config.json, index,
bf16 shards of at most 2 GB), a base and N experts (base + a gaussian task vector), written one shard in memory at
a time and regenerated only when the recorded description changes."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from vit_models import generator

SPEC_VERSION = 1
SHARD_BYTES = 2e9  # shards of the generated models: at most this, balanced


def llama_config(layers: int, hidden: int, intermediate: int, vocab: int) -> dict[str, object]:
    """A LlamaForCausalLM config: 64-wide heads, a quarter as many KV heads (grouped-query attention)."""
    heads = max(1, hidden // 64)
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": max(1, heads // 4), "vocab_size": vocab, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
            "rope_theta": 10000.0, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}


def llama_spec(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Hugging Face Llama tensor names and shapes, in the order of LlamaForCausalLM's state dict."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = hidden // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    spec = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        spec += [(p + "self_attn.q_proj.weight", (q, hidden)), (p + "self_attn.k_proj.weight", (kv, hidden)),
                 (p + "self_attn.v_proj.weight", (kv, hidden)), (p + "self_attn.o_proj.weight", (hidden, q)),
                 (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                 (p + "mlp.down_proj.weight", (hidden, inter)), (p + "input_layernorm.weight", (hidden,)),
                 (p + "post_attention_layernorm.weight", (hidden,))]
    return spec + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def llama_tensor(seed: int, expert: int | None, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """theta_0: N(0, 0.02) (norm weights 1 + N(0, 0.02)); an expert adds a gaussian task vector of std
    (0.5-2.5) x 5% of the weights' scale (~1e-3 on the matrices), large enough to survive the cast to bf16."""
    scale = 1.0 if name.endswith("norm.weight") else 0.02
    theta = (1.0 if scale == 1.0 else 0.0) + 0.02 * torch.randn(shape, generator=generator(seed, "llama", name))
    if expert is not None:
        g = generator(seed, "llama-expert", expert, name)
        std = 0.05 * scale * (0.5 + 2.0 * torch.rand((), generator=g).item())
        theta.add_(torch.randn(shape, generator=g), alpha=std)
    return theta.to(torch.bfloat16)


def write_llama(directory: Path, config: dict, seed: int, expert: int | None) -> None:
    """One model directory, one shard in memory at a time, written under a temporary name then renamed."""
    spec = llama_spec(config)
    sizes = [math.prod(shape) * 2 for _, shape in spec]
    shards = max(1, math.ceil(sum(sizes) / SHARD_BYTES))
    target, start, shard_of = sum(sizes) / shards, 0, []
    for size in sizes:  # balanced: tensor i goes to the shard its first byte falls in
        shard_of.append(min(shards - 1, int(start // target)))
        start += size
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map = {}
    for shard in range(shards):
        file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {n: llama_tensor(seed, expert, n, s) for (n, s), j in zip(spec, shard_of) if j == shard}
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, indent=2))
    tmp.rename(directory)



def ensure_models(workdir: Path, seed: int, config: dict, experts: int) -> tuple[Path, list[Path]]:
    """The base and `experts` expert directories in `workdir`, regenerated when the recorded description
    (version, seed, config) changes."""
    workdir.mkdir(parents=True, exist_ok=True)
    wanted = {"version": SPEC_VERSION, "seed": seed, "config": config}
    spec_file = workdir / "models.json"
    if spec_file.exists() and json.loads(spec_file.read_text()) != wanted:
        for old in [*workdir.glob("base*"), *workdir.glob("expert_*")]:
            shutil.rmtree(old)
    spec_file.write_text(json.dumps(wanted))
    params = sum(math.prod(shape) for _, shape in llama_spec(config))
    base, paths = workdir / "base", [workdir / f"expert_{i}" for i in range(experts)]
    for index, directory in [(None, base), *enumerate(paths)]:
        if not (directory / "model.safetensors.index.json").exists():
            print(f"generating {directory.name} ({params / 1e9:.3f} B params, bf16)", flush=True)
            write_llama(directory, config, seed, index)
    return base, paths
