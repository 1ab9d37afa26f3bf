"""Label-word scoring with a tiny T5 built from its config, and the GLUE metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

import mergeflow  # noqa: F401 - the torchvision fix runs before transformers is imported
from transformers import T5Config, T5ForConditionalGeneration

from mergeflow.families.seq2seq.scoring import (
    GLUE_TASKS,
    GlueTask,
    accuracy,
    average_ranks,
    classify,
    glue_metrics,
    matthews_corrcoef,
    pearson,
    predictions_from_scores,
    score_label_words,
    sequence_log_likelihoods,
    spearman,
    stsb_grid,
)
from mergeflow.errors import ConfigError, InputError

PAD, EOS, UNK = 0, 1, 2
WORDS = ("great film fun bad boring dull the a movie was plot acting positive negative maybe not at all "
         "review sentence : really").split()


class WordTokenizer:
    """A T5-like stand-in (no tokenizer can be downloaded here): one id per known word, `</s>` appended, pad 0."""

    vocab = {word: i + 3 for i, word in enumerate(WORDS)}

    def encode(self, text: str) -> list[int]:
        return [self.vocab.get(word, UNK) for word in text.replace(":", " : ").split()] + [EOS]

    def __call__(self, text=None, text_target=None, padding=False, truncation=False, max_length=None,
                 return_tensors=None):
        rows = [self.encode(t) for t in (text if text is not None else text_target)]
        if truncation and max_length:
            rows = [r[:max_length - 1] + [EOS] if len(r) > max_length else r for r in rows]
        if return_tensors != "pt":
            return {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}
        width = max(len(r) for r in rows)
        return {"input_ids": torch.tensor([r + [PAD] * (width - len(r)) for r in rows]),
                "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])}


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(WORDS) + 3, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=4, decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS,
                      dropout_rate=0.0)
    return T5ForConditionalGeneration(config).eval()


pytestmark = pytest.mark.usefixtures("single_threaded")


TEXTS = ["great film", "the movie was really fun", "bad", "boring plot and dull acting", "a great movie"]
SENTIMENT = [1, 1, 0, 0, 1]


@pytest.fixture(scope="module")
def trained() -> T5ForConditionalGeneration:
    """A tiny T5 taught to answer `positive` / `negative` for the texts above (about 1 s)."""
    model, tokenizer = tiny_t5(1), WordTokenizer()
    inputs = tokenizer(TEXTS, padding=True, return_tensors="pt")
    targets = tokenizer(text_target=[("negative", "positive")[y] for y in SENTIMENT], padding=True,
                        return_tensors="pt")["input_ids"]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        loss = model(**inputs, labels=targets).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


# ---------------------------------------------------------------------------------------------- scoring


def _direct_log_likelihood(model, text: str, word: str) -> float:
    """-(mean token loss) * length from the model's own loss, one unpadded example at a time."""
    tokenizer = WordTokenizer()
    inputs = tokenizer([text], return_tensors="pt")
    labels = tokenizer([word], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return -float(model(**inputs, labels=labels).loss) * labels.shape[1]


def test_scores_equal_the_models_own_loss() -> None:
    model, tokenizer = tiny_t5(), WordTokenizer()
    words = ["positive", "not at all", "maybe not", "negative"]  # 2 to 4 target tokens with </s>
    scores = score_label_words(model, tokenizer, TEXTS, words, batch_size=2)
    assert scores.shape == (5, 4) and scores.dtype == torch.float32
    direct = torch.tensor([[_direct_log_likelihood(model, t, w) for w in words] for t in TEXTS])
    torch.testing.assert_close(scores, direct, atol=1e-4, rtol=1e-4)
    lengths = torch.tensor([len(tokenizer.encode(w)) for w in words], dtype=torch.float32)
    normalised = score_label_words(model, tokenizer, TEXTS, words, batch_size=3, length_normalize=True)
    torch.testing.assert_close(normalised, direct / lengths, atol=1e-4, rtol=1e-4)
    assert torch.equal(classify(model, tokenizer, TEXTS, words), direct.argmax(dim=-1))


def test_classify_picks_the_word_the_model_was_taught(trained) -> None:
    tokenizer = WordTokenizer()
    predicted = classify(trained, tokenizer, TEXTS, ["negative", "positive"], batch_size=2)
    assert predicted.tolist() == SENTIMENT
    # the same texts under words it was not taught to prefer: scores still match the direct loss
    untaught = tiny_t5(1)
    assert classify(untaught, tokenizer, TEXTS, ["negative", "positive"]).tolist() != SENTIMENT
    inputs = tokenizer(TEXTS, padding=True, return_tensors="pt")
    scores = sequence_log_likelihoods(trained, inputs["input_ids"], inputs["attention_mask"],
                                      [tokenizer.encode("negative"), tokenizer.encode("positive")])
    margin = (scores[:, 1] - scores[:, 0]) * torch.tensor([1.0 if y else -1.0 for y in SENTIMENT])
    assert (margin > 1.0).all()
    with pytest.raises(InputError, match="at least one token"):
        sequence_log_likelihoods(trained, inputs["input_ids"], inputs["attention_mask"], [[]])


def test_glue_evaluation_end_to_end(trained) -> None:
    from mergeflow.families.seq2seq.model import evaluate_seq2seq

    task = GlueTask("sst2", "{sentence}", ("negative", "positive"), "accuracy")
    texts = [task.format({"sentence": t, "idx": i}) for i, t in enumerate(TEXTS)]
    assert evaluate_seq2seq(trained, WordTokenizer(), {"sst2": (task, texts, SENTIMENT)}) == {"sst2": 1.0}
    flipped = [1 - y for y in SENTIMENT]
    assert evaluate_seq2seq(trained, WordTokenizer(), {"sst2": (task, texts, flipped)}) == {"sst2": 0.0}


# ---------------------------------------------------------------------------------------------- metrics


def test_matthews_against_hand_computed_values() -> None:
    # binary: TP=2, FP=1, TN=2, FN=1 -> (2*2 - 1*1) / sqrt(3*3*3*3) = 1/3
    assert matthews_corrcoef([1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 1]) == pytest.approx(1 / 3)
    # three classes: s=6, c=4, p=(2,2,2), t=(1,3,2) -> (24 - 12) / sqrt((36 - 12)(36 - 14))
    assert matthews_corrcoef([0, 1, 2, 2, 1, 0], [0, 1, 2, 1, 1, 2]) == pytest.approx(12 / math.sqrt(24 * 22))
    assert matthews_corrcoef([0, 1, 1, 0], [0, 1, 1, 0]) == pytest.approx(1.0)
    assert matthews_corrcoef([1, 0, 0, 1], [0, 1, 1, 0]) == pytest.approx(-1.0)
    assert matthews_corrcoef([1, 1, 1, 1], [0, 1, 1, 0]) == 0.0  # constant prediction
    with pytest.raises(InputError, match="3 predictions for 2 labels"):
        matthews_corrcoef([0, 1, 1], [0, 1])


def test_spearman_pearson_and_ranks_with_ties() -> None:
    assert average_ranks([3, 1, 3, 3, 2]).tolist() == [4.0, 1.0, 4.0, 4.0, 2.0]
    # ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4): r = 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([1, 2, 3, 4], [10, 100, 1000, 10000]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # x = (1, 2, 3), y = (2, 4, 7): r = 5 / sqrt(2 * 114 / 9)
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(2 * 114 / 9))
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    assert accuracy([1, 0, 2, 2], [1, 0, 0, 2]) == 0.75


def test_metrics_agree_with_scipy_and_sklearn_when_installed() -> None:
    stats = pytest.importorskip("scipy.stats")
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 6, (200,), generator=g).double() / 2  # many ties
    y = x + torch.randint(0, 4, (200,), generator=g).double()
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x.numpy(), y.numpy())[0], abs=1e-12)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x.numpy(), y.numpy())[0], abs=1e-12)
    p, t = torch.randint(0, 3, (300,), generator=g), torch.randint(0, 3, (300,), generator=g)
    t[:150] = p[:150]
    assert matthews_corrcoef(p, t) == pytest.approx(metrics.matthews_corrcoef(t.numpy(), p.numpy()), abs=1e-12)


# ---------------------------------------------------------------------------------------------- GLUE tasks


def test_glue_tasks_templates_and_metrics() -> None:
    assert sorted(GLUE_TASKS) == ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb"]
    mnli = GLUE_TASKS["mnli"]
    assert mnli.fields == ("hypothesis", "premise")
    assert mnli.format({"premise": "It rains.", "hypothesis": "It is wet.", "label": 0}) == \
        "mnli hypothesis: It is wet. premise: It rains."
    with pytest.raises(InputError, match="no field 'sentence2'"):
        GLUE_TASKS["rte"].format({"sentence1": "a"})

    cola = glue_metrics(GLUE_TASKS["cola"], [1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 1])
    assert cola == {"accuracy": pytest.approx(4 / 6), "matthews": pytest.approx(1 / 3), "score": pytest.approx(1 / 3)}
    assert glue_metrics(GLUE_TASKS["qqp"], [0, 1], [0, 0]) == {"accuracy": 0.5, "score": 0.5}
    stsb = glue_metrics(GLUE_TASKS["stsb"], [1, 2, 2, 3], [1.0, 3.5, 2.0, 4.2])
    assert stsb["score"] == stsb["spearman"] == pytest.approx(4.5 / math.sqrt(22.5)) and "pearson" in stsb


def test_stsb_regression_by_scoring_numbers() -> None:
    words, values = stsb_grid(0.2)
    assert len(words) == 26 and words[0] == "0.0" and words[1] == "0.2" and words[-1] == "5.0"
    assert GLUE_TASKS["stsb"].label_words == words and values[13] == pytest.approx(2.6)
    assert len(stsb_grid(0.1)[0]) == 51
    with pytest.raises(ConfigError, match="divide 5"):
        stsb_grid(0.3)
    task = GlueTask("toy", "{s}", ("1.0", "2.0", "4.0"), "spearman", (1.0, 2.0, 4.0))
    scores = torch.tensor([[0.0, math.log(3.0), 0.0], [-5.0, -1.0, -0.5]])
    assert predictions_from_scores(task, scores).tolist() == [2.0, 4.0]
    expected = predictions_from_scores(task, scores, regression="expected")
    assert expected[0].item() == pytest.approx((1.0 + 3 * 2.0 + 4.0) / 5)
    classes = GlueTask("c", "{s}", ("no", "yes"), "accuracy")
    assert predictions_from_scores(classes, torch.tensor([[0.0, 1.0], [2.0, 1.0]])).tolist() == [1, 0]
    with pytest.raises(ConfigError, match="needs values"):
        GlueTask("bad", "{s}", ("1", "2"), "spearman")
    with pytest.raises(InputError, match="scores for 3 words"):
        predictions_from_scores(classes, scores)
