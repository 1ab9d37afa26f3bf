"""The merge flow on the papers' model families, with tiny models of the real architectures built on the fly:
open_clip and Hugging Face CLIP vision towers fine-tuned on the real digits and MNIST-subset images under
zero-shot heads, and a tiny T5 fine-tuned on real movie reviews and tweets by scoring label words; every merge
method of the reproduction configs runs and is scored through the flow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import mergeflow  # noqa: F401 - the torchvision fix runs before open_clip / transformers are imported

pytestmark = pytest.mark.slow

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHORT = {  # the reproduction configs' methods with budgets cut to seconds
    "adamerging": {"steps": 3},
    "doge_ta": {"steps": 4},
    "doge_am": {"steps": 3, "am_steps": 2},
    "mats": {"max_iter": 5},
    "wudi": {"steps": 20},
}


def _from_reproduction(file_name: str, tmp_path: Path, cache: Path, model: dict, tasks: list[dict],
                       methods: set[str] | None = None, steps: int = 300) -> dict:
    """A reproduction config with its model and tasks replaced by tiny ones, local storage, short budgets."""
    raw = yaml.safe_load((CONFIGS / file_name).read_text())
    merges = []
    for spec in raw["merges"]:
        if methods is not None and spec["method"] not in methods:
            continue
        spec = {**spec, "params": {**spec.get("params", {}), **SHORT.get(spec["method"], {})}}
        if "sweep" in spec:
            from mergeflow.methods import method_class

            spec["sweep"] = {method_class(spec["method"]).scaling_param: [0.3, 1.0]}
        merges.append(spec)
    raw.update({
        "name": f"tiny-{raw['model']['family']}",
        "model": model,
        "tasks": tasks,
        "data": {"train": 320, "validation": 32, "test": 96},
        "finetune": {"steps": steps, "batch_size": 16, "lr": 1e-3, "warmup_steps": 10, "max_length": 32,
                     "checkpoint_every": 100},
        "merges": merges,
        "statistics": {**raw["statistics"], "max_examples": 16, "batch_size": 8, "max_length": 32},
        "tuning": {"max_examples": 32},
        "evaluation": {"batch_size": 32, "max_length": 32},
        "storage": {"root": str(tmp_path / "store"), "cache_dir": str(cache)},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": raw["name"]},
        "device": "cpu",
    })
    return raw


def _check_summary(summary: dict, config, base_dir: Path) -> None:
    from safetensors import safe_open

    from mergeflow.checkpoints import open_checkpoint

    names = [t.name for t in config.tasks]
    assert set(summary["accuracy"]) == {"pretrained", *(f"expert:{n}" for n in names), *config.merge_labels()}
    for row in summary["accuracy"].values():
        assert set(row) == set(names)
    with safe_open(str(base_dir / "model.safetensors"), framework="pt") as base:
        base_keys = set(base.keys())
    for label, ref in summary["merged"].items():
        with open_checkpoint(ref["uri"]) as merged:
            assert set(merged.keys()) == base_keys, label  # exactly the family's merged tensors
            assert merged.digest == ref["sha256"] and merged.metadata["merge_method"] == label.removesuffix("-tuned")
    experts_trained = [t.name for t in config.tasks if not t.expert]
    for name in experts_trained:  # fine-tuning in the flow learned each task
        assert summary["accuracy"][f"expert:{name}"][name] > summary["accuracy"]["pretrained"][name] + 0.1, name


def _rescore(family: str, base_dir: Path, weights_uri: str, tasks: dict, store_heads: dict) -> dict[str, float]:
    """Score a stored merged model outside the flow with the family's own calls: the flow's numbers must match."""
    import torch

    from mergeflow.checkpoints import open_checkpoint
    from mergeflow.families import get_family

    fam = get_family(family)
    with open_checkpoint(weights_uri) as merged:
        weights = {key: merged.get(key) for key in merged.keys()}
    model = fam.load(base_dir, weights, torch.device("cpu"))
    splits = {name: (fam.load_head(Path(store_heads[name]), name), fam.read_dataset(Path(uri), name, ["test"])
                     .splits["test"]) for name, uri in tasks.items()}
    from mergeflow.config import EvalConfig

    scored = fam.evaluate(model, splits, EvalConfig(batch_size=32, max_length=32))
    by_hand = {name: _hand_accuracy(family, model, head, split) for name, (head, split) in splits.items()}
    # the same count of correct examples (the library averages in float32: compare to well within 1 / examples)
    assert by_hand == pytest.approx(scored, abs=1e-6), "the family's score differs from a count by hand"
    return scored


def _hand_accuracy(family: str, model, head, split) -> float:
    """Accuracy counted example by example with plain Python: the highest-scoring class of each example (CLIP:
    logit_scale * (w_c . f + b_c) over the head's rows; seq2seq: the label word of highest log-likelihood) is
    compared with its label. Only the encoder's features / the label-word scores come from the library."""
    import torch

    correct = 0
    if family == "seq2seq":
        from mergeflow.families.seq2seq.scoring import score_label_words

        scores = score_label_words(model.module, model.tokenizer, split.texts, head.label_words, max_length=32)
        for row, label in zip(scores.tolist(), split.labels):
            correct += max(range(len(row)), key=row.__getitem__) == int(label)
        return correct / len(split.labels)
    weight, bias = head.weight.tolist(), head.bias.tolist()
    model.module.eval()
    with torch.no_grad():
        for image, label in zip(split.images, split.labels):
            feature = model.module(model.module.preprocess([image])).flatten().tolist()
            logits = [head.logit_scale * (sum(w * f for w, f in zip(row, feature)) + b) for row, b in zip(weight, bias)]
            correct += max(range(len(logits)), key=logits.__getitem__) == int(label)
    return correct / len(split.labels)


def _stored(summary: dict, config) -> tuple[dict, dict]:
    """Each task's dataset and head locations, from the store's layout."""
    store = Path(config.storage.root)
    datasets = {t.name: t.dataset or str(next((store / "datasets").glob(f"{t.name}-*"))) for t in config.tasks}
    heads = {t.name: t.head or str(next((store / "heads").glob(f"{t.name}-*"))) for t in config.tasks}
    return datasets, heads


def test_open_clip_flow_runs_every_method_of_the_vit_config(tmp_path, tmp_path_factory, prefect_harness):
    from mlflow.tracking import MlflowClient

    from flows.merge_flow import merge_flow
    from mergeflow.config import AtmConfig, RunConfig
    from tiny_clip import tiny_open_clip_dir

    base_dir = tiny_open_clip_dir(tmp_path / "model")
    raw = _from_reproduction("clip-vit-b32-ta8.yaml", tmp_path, tmp_path_factory.mktemp("cache"),
                             {"family": "open_clip", "pretrained": str(base_dir)},
                             [{"name": "digits"}, {"name": "mnist"}])
    config = RunConfig.model_validate(raw)
    summary = merge_flow(config)

    _check_summary(summary, config, base_dir)
    datasets, heads = _stored(summary, config)
    assert all(h.endswith(".safetensors") for h in heads.values())
    from mergeflow.families.clip.model_dir import clip_zeroshot_head
    from mergeflow.families.clip.templates import templates_for
    from mergeflow.heads import ClassificationHead

    digits_head = ClassificationHead.load(Path(heads["digits"]))  # the zero-shot head of the task's own templates
    expected = clip_zeroshot_head(base_dir, "open_clip", [str(d) for d in range(10)], templates_for("digits"))
    assert torch.equal(digits_head.weight, expected.weight)
    rescored = _rescore("open_clip", base_dir, summary["merged"]["ties"]["uri"], datasets, heads)
    assert rescored == pytest.approx(summary["accuracy"]["ties"], abs=1e-9)
    run = MlflowClient(config.tracking.tracking_uri).get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["model.family"] == "open_clip"

    # ATM on the same family: two rounds from theta_0, each task fine-tuned from the current merge
    from flows.atm_flow import atm_flow

    atm = atm_flow(config.model_copy(update={"name": "tiny-atm", "atm": AtmConfig(rounds=2, steps_per_round=150)}))
    assert [r["round"] for r in atm["rounds"]] == [1, 2]
    pretrained_avg = sum(summary["accuracy"]["pretrained"].values()) / 2
    assert sum(atm["rounds"][-1]["accuracy"].values()) / 2 > pretrained_avg + 0.1


def test_hf_clip_flow_with_vision_only_experts_a_given_head_and_an_image_folder_dataset(tmp_path, tmp_path_factory, prefect_harness):
    from PIL import Image

    from flows.merge_flow import merge_flow
    from mergeflow.families.clip.model_dir import clip_zeroshot_head
    from mergeflow.config import RunConfig
    from mergeflow.families.clip.data import ImageSplitSizes, load_digits_task
    from tiny_clip import tiny_hf_clip_dir

    base_dir = tiny_hf_clip_dir(tmp_path / "model", merge_projection=False)  # FusionBench's vision-only experts
    digits = load_digits_task(seed=1, sizes=ImageSplitSizes(train=160, validation=32, test=96))
    folder = tmp_path / "digit-folders"  # the image-folder layout: <split>/<class>/<image>
    for split_name, split in digits.splits.items():
        for i, (image, label) in enumerate(zip(split.images, split.labels)):
            target = folder / split_name / digits.class_names[label] / f"{i}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.Image.save(image, target)
    head = tmp_path / "heads" / "mnist.safetensors"  # a head the user brings (here: the zero-shot one, built once)
    head.parent.mkdir()
    clip_zeroshot_head(base_dir, "hf_clip", [str(d) for d in range(10)], ['a photo of the number: "{}".']).save(head)

    raw = _from_reproduction("clip-vit-b32-ta8.yaml", tmp_path, tmp_path_factory.mktemp("cache"),
                             {"family": "hf_clip", "pretrained": str(base_dir)},
                             [{"name": "digits", "dataset": str(folder)}, {"name": "mnist", "head": str(head)}],
                             methods={"task_arithmetic", "ties", "regmean", "fisher", "mats", "adamerging"})
    config = RunConfig.model_validate(raw)
    summary = merge_flow(config)

    _check_summary(summary, config, base_dir)
    datasets, heads = _stored(summary, config)
    assert heads["mnist"] == str(head)
    rescored = _rescore("hf_clip", base_dir, summary["merged"]["regmean"]["uri"], datasets, heads)
    assert rescored == pytest.approx(summary["accuracy"]["regmean"], abs=1e-9)


def test_seq2seq_flow_fine_tunes_merges_and_scores_label_words(tmp_path, tmp_path_factory, prefect_harness):
    from flows.merge_flow import merge_flow
    from mergeflow.families.seq2seq.scoring import GlueTask
    from mergeflow.config import RunConfig
    from mergeflow.families.seq2seq.data import save_seq2seq_task
    from mergeflow.families.text.data import SplitSizes, load_text_task
    from tiny_t5 import tiny_t5_model_dir

    wheels = tmp_path_factory.mktemp("wheels")
    sizes = SplitSizes(probe_per_class=1, train=160, validation=32, test=96)
    reviews = load_text_task("rotten_tomatoes", cache_dir=wheels, sizes=sizes)
    tweets = load_text_task("election", cache_dir=wheels, sizes=sizes)
    prompts = {
        "sst2": (reviews, GlueTask("sst2", "sst2 sentence: {sentence}", tuple(reviews.class_names), "accuracy")),
        "tweets": (tweets, GlueTask("tweets", "who wrote: {sentence}", tuple(tweets.class_names), "accuracy")),
    }
    datasets = {}
    for name, (task, prompt) in prompts.items():
        datasets[name] = tmp_path / "data" / name
        save_seq2seq_task(name, prompt, {s: [{"sentence": t} for t in task.splits[s].texts]
                                         for s in ("train", "validation", "test")},
                          {s: task.splits[s].labels for s in ("train", "validation", "test")}, str(datasets[name]))
    texts = [t for task, _ in prompts.values() for s in task.splits.values() for t in s.texts]
    words = [w for _, prompt in prompts.values() for w in prompt.label_words]
    base_dir = tiny_t5_model_dir(tmp_path / "model", texts + words)

    raw = _from_reproduction("flan-t5-base-glue8.yaml", tmp_path, tmp_path_factory.mktemp("cache"),
                             {"family": "seq2seq", "pretrained": str(base_dir)},
                             [{"name": n, "dataset": str(d)} for n, d in datasets.items()],
                             methods={"task_arithmetic", "ties", "doge_ta", "regmean", "fisher", "mats",
                                      "adamerging"})
    raw["finetune"]["lr"] = 3e-3
    config = RunConfig.model_validate(raw)
    summary = merge_flow(config)

    _check_summary(summary, config, base_dir)
    stored, heads = _stored(summary, config)
    assert json.loads(Path(heads["sst2"]).read_text())["template"] == "sst2 sentence: {sentence}"
    rescored = _rescore("seq2seq", base_dir, summary["merged"]["ties"]["uri"], stored, heads)
    assert rescored == pytest.approx(summary["accuracy"]["ties"], abs=1e-9)
