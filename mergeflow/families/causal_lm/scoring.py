"""Scoring a causal LM as EleutherAI's lm-evaluation-harness does: log-likelihoods of continuations, multiple
choice (acc, acc_norm), rolling perplexity and exact match of greedy generations, one batch at a time.

Requests are (context, continuation) strings encoded as the harness encodes them: trailing whitespace of the
context moves to the continuation, the continuation's tokens are those of `context + continuation` after the
context's own (so a merge across the boundary is handled), no special tokens are added, and an empty context
becomes the prefix token (BOS, else EOS). A request longer than `max_length + 1` tokens keeps its last ones (the
harness truncates on the left too), and `max_length` is cut to the model's context window (its position table or
trained positions: `context_length`). Batches run longest first, right-padded, under `torch.no_grad`, one model at
a time, each of at most `batch_size` rows and `tokens_per_forward` tokens (so one pass's logits stay within
`LOGITS_BUDGET` bytes whatever batch_size x max_length asks: 64 x 2048 tokens at vocab 32,000 would be 16 GB of fp32
logits); every batch and every decoder layer is a stop point (`mergeflow.stopping`), so a stop request ends an
evaluation within one layer's time, however long a batch takes.

Multiple choice: each choice is scored as the continuation `target_delimiter + choice` after the question; `acc`
takes the highest summed log-likelihood, `acc_norm` the highest log-likelihood per character of the choice (the
harness's `len(choice)`; bytes and characters agree for ASCII). Perplexity: the text is cut into disjoint windows
of `max_length` predicted tokens, each token seeing the tokens before it in its window and the one token before
the window (the harness's rolling log-likelihood with context length 1); perplexity = exp(total NLL / predicted tokens) over the whole split, and bits per byte =
total NLL / ln 2 / UTF-8 bytes (tokenizer-independent, as the harness reports). The family's primary score of a
perplexity task is 1 / perplexity: in (0, 1], higher is better, and an expert-normalised score is the ratio of
perplexities (expert / model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from mergeflow import stopping
from mergeflow.errors import ConfigError, InputError
from mergeflow.families.base import device_of
from mergeflow.families.causal_lm.data import AnswerSplit, CausalSplit, ChoiceSplit, Kind, TextSplit
from mergeflow.progress import progress_bar

Request = tuple[list[int], list[int]]  # (context tokens, continuation tokens)
PROMPT_FORMAT = "mergeflow-causal-lm-task/1"
LOGITS_BUDGET = 1 << 29  # bytes of fp32 logits one forward pass may produce: 64 rows x 64 tokens at vocab 32,000
_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")


@dataclass(frozen=True)
class TaskPrompt:
    """How a task is put to the model (the family's "head", one small JSON file): its kind, the string between
    question and answer, and for short answers the generation budget and the string that ends an answer."""

    kind: Kind
    target_delimiter: str = " "
    max_new_tokens: int = 32
    stop: str = "\n"


def save_prompt(prompt: TaskPrompt, path: Path) -> None:
    path.write_text(json.dumps({"format": PROMPT_FORMAT, **dataclasses.asdict(prompt)}, indent=2))


def load_prompt(path: Path, label: str) -> TaskPrompt:
    """A stored TaskPrompt; ConfigError naming `label` when the file is not one."""
    try:
        raw = json.loads(Path(path).read_text())
        if raw.pop("format") != PROMPT_FORMAT:
            raise ValueError(f"format is not {PROMPT_FORMAT}")
        prompt = TaskPrompt(**raw)
        if prompt.kind not in ("multiple_choice", "perplexity", "exact_match") or prompt.max_new_tokens < 1:
            raise ValueError(f"kind {prompt.kind!r} or max_new_tokens {prompt.max_new_tokens} out of range")
        return prompt
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{label}: not a causal-LM task prompt (JSON with format {PROMPT_FORMAT!r}, kind, "
                          f"target_delimiter, max_new_tokens, stop): {exc}") from None


# ---------------------------------------------------------------------------------------------- encoding


def prefix_token(tokenizer: Any) -> int:
    """What an empty context becomes: BOS, else EOS (as the harness)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise InputError("the tokenizer has neither a BOS nor an EOS token to start a text with")
    return int(token)


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_pair(tokenizer: Any, context: str, continuation: str) -> Request:
    """(context tokens, continuation tokens) as the harness's `_encode_pair` and empty-context rule make them."""
    if not context:
        return [prefix_token(tokenizer)], encode(tokenizer, continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = encode(tokenizer, context) if context else [prefix_token(tokenizer)]
    whole = encode(tokenizer, context + continuation)
    return context_ids, whole[len(context_ids):] if context else encode(tokenizer, continuation)


def choice_requests(tokenizer: Any, split: ChoiceSplit, prompt: TaskPrompt) -> list[list[Request]]:
    """Per question, one request per choice: the question, then `target_delimiter + choice`."""
    result = []
    for row, (question, choices) in enumerate(zip(split.questions, split.choices, strict=True)):
        requests = [encode_pair(tokenizer, question, prompt.target_delimiter + choice) for choice in choices]
        if any(not continuation for _, continuation in requests):
            raise InputError(f"example {row}: a choice encodes to no tokens after its question")
        result.append(requests)
    return result


def rolling_requests(tokenizer: Any, text: str, max_length: int) -> list[Request]:
    """The text's disjoint windows of at most `max_length` predicted tokens, each after the token before it (the
    first after the prefix token)."""
    tokens = [prefix_token(tokenizer), *encode(tokenizer, text)]
    return [([tokens[start - 1]], tokens[start:start + max_length]) for start in range(1, len(tokens), max_length)]


def _window(request: Request, max_length: int) -> tuple[list[int], list[int], int]:
    """(input ids, target ids, number of continuation targets at the end) of a request cut to its last
    `max_length + 1` tokens."""
    context, continuation = request
    tokens = (context + continuation)[-(max_length + 1):]
    return tokens[:-1], tokens[1:], min(len(continuation), len(tokens) - 1)


# ---------------------------------------------------------------------------------------------- limits


def context_length(model: nn.Module, max_length: int) -> int:
    """`max_length` cut to the model's context window (the smallest of its config's position limits), so a window
    never indexes past GPT-2's position table or runs past the positions a rotary model was built for."""
    config = getattr(model, "config", None)
    limits = [value for value in (getattr(config, name, None) for name in _CONTEXT_FIELDS)
              if isinstance(value, int) and value > 0]
    return min([max_length, *limits])


def tokens_per_forward(model: nn.Module) -> int:
    """Tokens one forward pass may carry: `LOGITS_BUDGET` over the fp32 bytes of one token's logits (at least 1)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab <= 0:
        vocab = model.get_output_embeddings().weight.shape[0]
    return max(1, LOGITS_BUDGET // (4 * vocab))


def token_batches(order: Sequence[int], widths: Sequence[int], batch_size: int, max_tokens: int) -> list[list[int]]:
    """`order` (longest first) cut into consecutive batches of at most `batch_size` rows whose rows x longest width
    stays within `max_tokens` (a row longer than that alone goes alone)."""
    batches: list[list[int]] = []
    for index in order:
        current = batches[-1] if batches else None
        if current and len(current) < batch_size and (len(current) + 1) * widths[current[0]] <= max_tokens:
            current.append(index)
        else:
            batches.append([index])
    return batches


# ---------------------------------------------------------------------------------------------- log-likelihoods


def padded_batch(requests: Sequence[Request], max_length: int, pad_id: int, device: torch.device
                 ) -> tuple[Tensor, Tensor, list[tuple[list[int], list[int], int]]]:
    """Right-padded input ids and attention mask [B, T] of the requests cut to `max_length + 1` tokens, and each
    one's (inputs, targets, continuation count)."""
    windows = [_window(request, max_length) for request in requests]
    width = max(len(inputs) for inputs, _, _ in windows)
    ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(windows), width), dtype=torch.long)
    for row, (inputs, _, _) in enumerate(windows):
        ids[row, :len(inputs)] = torch.tensor(inputs)
        mask[row, :len(inputs)] = 1
    return ids.to(device), mask.to(device), windows


def forward_logits(model: nn.Module, ids: Tensor, mask: Tensor, weights: Mapping[str, Tensor] | None = None) -> Tensor:
    """[B, T, V] logits of the model, or of the model with `weights` (checkpoint names) swapped in."""
    if weights is None:
        return model(input_ids=ids, attention_mask=mask).logits
    return functional_call(model, dict(weights), (), {"input_ids": ids, "attention_mask": mask}).logits


def request_log_likelihoods(model: nn.Module, requests: Sequence[Request], max_length: int,
                            pad_id: int = 0, weights: Mapping[str, Tensor] | None = None) -> Tensor:
    """[N] float32 summed log-probabilities of each request's continuation tokens, in one right-padded forward on
    the model's device (with `weights` swapped in when given); differentiable, the model's mode left alone."""
    ids, mask, windows = padded_batch(requests, max_length, pad_id, device_of(model))
    logits = forward_logits(model, ids, mask, weights)
    totals = []
    for row, (inputs, targets, count) in enumerate(windows):
        end = len(inputs)
        log_probs = logits[row, end - count:end].float().log_softmax(dim=-1)
        wanted = torch.tensor(targets[end - count:end], device=log_probs.device)
        totals.append(log_probs.gather(-1, wanted[:, None]).sum())
    return torch.stack(totals)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """While inside: eval mode, and every decoder layer checks the stop flag before it runs, so a stop lands within
    one layer's time even where one batch takes minutes (a billion parameters on two cores); the interrupted
    forward's results are dropped, nothing is written. The model's mode is restored on exit."""
    was_training = model.training
    layers = getattr(model.config, "num_hidden_layers", None)
    handles = [layer.register_forward_pre_hook(lambda *_: stopping.check())
               for module in model.modules() if isinstance(module, nn.ModuleList) and len(module) == layers
               for layer in module]
    model.eval()
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


@torch.no_grad()
def log_likelihoods(model: nn.Module, requests: Sequence[Request], *, batch_size: int, max_length: int,
                    pad_id: int = 0, progress: bool = False, desc: str = "score",
                    max_tokens: int | None = None) -> Tensor:
    """[N] float64 CPU `request_log_likelihoods` of every request in eval mode, batched longest first, each batch
    within `batch_size` rows and `max_tokens` tokens (default `tokens_per_forward`); checks the stop flag before
    every batch and every decoder layer (`evaluating`)."""
    widths = [len(_window(request, max_length)[0]) for request in requests]
    order = sorted(range(len(requests)), key=lambda i: -widths[i])
    batches = token_batches(order, widths, batch_size, max_tokens or tokens_per_forward(model))
    result = torch.empty(len(requests), dtype=torch.float64)
    with evaluating(model):
        for chunk in progress_bar(batches, desc=desc, disable=not progress):
            stopping.check()
            result[chunk] = request_log_likelihoods(model, [requests[i] for i in chunk], max_length,
                                                    pad_id).double().cpu()
    return result


def pad_id_of(tokenizer: Any) -> int:
    """Any id for padding positions (masked out): the tokenizer's pad token, else EOS, else 0."""
    for token in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token is not None:
            return int(token)
    return 0


# ---------------------------------------------------------------------------------------------- the three kinds


def multiple_choice_metrics(model: nn.Module, tokenizer: Any, split: ChoiceSplit, prompt: TaskPrompt, *,
                            batch_size: int, max_length: int, progress: bool = False) -> dict[str, Any]:
    """acc, acc_norm, per question the choices' log-likelihoods (`loglik`) and log-likelihoods per character
    (`loglik_norm`), lists of lists, and whether acc_norm credits it (`credits`, 1/0)."""
    per_question = choice_requests(tokenizer, split, prompt)
    flat = [request for requests in per_question for request in requests]
    scores = log_likelihoods(model, flat, batch_size=batch_size, max_length=max_length, pad_id=pad_id_of(tokenizer),
                             progress=progress, desc="choices").tolist()
    logliks, per_char, credits, start, correct = [], [], [], 0, 0
    for choices, answer in zip(split.choices, split.answers, strict=True):
        row = scores[start:start + len(choices)]
        start += len(choices)
        normalised = [value / len(choice) for value, choice in zip(row, choices, strict=True)]
        logliks.append(row)
        per_char.append(normalised)
        correct += max(range(len(row)), key=row.__getitem__) == answer
        credits.append(int(max(range(len(row)), key=normalised.__getitem__) == answer))
    count = len(split.answers)
    return {"acc": correct / count, "acc_norm": sum(credits) / count, "loglik": logliks, "loglik_norm": per_char,
            "credits": credits}


def perplexity_metrics(model: nn.Module, tokenizer: Any, split: TextSplit, *, batch_size: int, max_length: int,
                       progress: bool = False) -> dict[str, float]:
    """Token-level perplexity of the split's texts (rolling windows), its NLL per token, bits per byte, the
    number of predicted tokens, and `score` = 1 / perplexity."""
    requests = [request for text in split.texts for request in rolling_requests(tokenizer, text, max_length)]
    tokens = sum(len(continuation) for _, continuation in requests)
    if tokens == 0:
        raise InputError("the texts encode to no tokens")
    nll = -float(log_likelihoods(model, requests, batch_size=batch_size, max_length=max_length,
                                 pad_id=pad_id_of(tokenizer), progress=progress, desc="perplexity").sum())
    data_bytes = sum(len(text.encode("utf-8")) for text in split.texts)
    return {"perplexity": math.exp(nll / tokens), "nll_per_token": nll / tokens, "tokens": float(tokens),
            "bits_per_byte": nll / math.log(2) / data_bytes, "score": math.exp(-nll / tokens)}


@torch.no_grad()
def greedy_answers(model: nn.Module, tokenizer: Any, questions: Sequence[str], prompt: TaskPrompt, *,
                   batch_size: int, max_length: int, progress: bool = False) -> list[str]:
    """Each question's greedy continuation (`prompt.max_new_tokens` tokens at most), cut at the first
    `prompt.stop` and stripped. Contexts keep their last `max_length` tokens (fewer where the context window must
    also hold the new tokens); batches of at most `batch_size` rows and `tokens_per_forward` tokens, left-padded;
    stop points as in `log_likelihoods`."""
    device, pad = device_of(model), pad_id_of(tokenizer)
    keep = max(1, context_length(model, max_length + prompt.max_new_tokens) - prompt.max_new_tokens)
    contexts = [(encode(tokenizer, q) if q else [prefix_token(tokenizer)])[-keep:] for q in questions]
    answers = [""] * len(questions)
    order = sorted(range(len(questions)), key=lambda i: -len(contexts[i]))
    widths = [len(context) + prompt.max_new_tokens for context in contexts]
    with evaluating(model):
        for chunk in progress_bar(token_batches(order, widths, batch_size, tokens_per_forward(model)),
                                  desc="generate", disable=not progress):
            stopping.check()
            width = max(len(contexts[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids[row, width - len(contexts[i]):] = torch.tensor(contexts[i])
                mask[row, width - len(contexts[i]):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=prompt.max_new_tokens, pad_token_id=pad,
                                 eos_token_id=tokenizer.eos_token_id)
            for row, i in enumerate(chunk):
                text = tokenizer.decode(out[row, width:], skip_special_tokens=True)
                answers[i] = (text.split(prompt.stop, 1)[0] if prompt.stop else text).strip()
    return answers


def exact_match_metrics(model: nn.Module, tokenizer: Any, split: AnswerSplit, prompt: TaskPrompt, *,
                        batch_size: int, max_length: int, progress: bool = False) -> dict[str, Any]:
    """exact_match: share of greedy answers equal to the reference (both stripped, case kept); `answers` and each
    one's `credits` (1/0)."""
    answers = greedy_answers(model, tokenizer, split.questions, prompt, batch_size=batch_size, max_length=max_length,
                             progress=progress)
    credits = [int(a == ref.strip()) for a, ref in zip(answers, split.answers, strict=True)]
    return {"exact_match": sum(credits) / len(credits), "answers": answers, "credits": credits}


PRIMARY = {"multiple_choice": "acc_norm", "perplexity": "score", "exact_match": "exact_match"}


def task_metrics(model: nn.Module, tokenizer: Any, prompt: TaskPrompt, split: CausalSplit, *, batch_size: int,
                 max_length: int, progress: bool = False) -> dict[str, Any]:
    """Every metric of the split's kind (the prompt must be of the same kind); `primary` repeats the family's
    primary score (acc_norm, 1 / perplexity, or exact match)."""
    if prompt.kind != split.kind:
        raise ConfigError(f"the task's prompt is for a {prompt.kind} task, its data is {split.kind}")
    options = {"batch_size": batch_size, "max_length": context_length(model, max_length), "progress": progress}
    if isinstance(split, ChoiceSplit):
        result = multiple_choice_metrics(model, tokenizer, split, prompt, **options)
    elif isinstance(split, TextSplit):
        result = perplexity_metrics(model, tokenizer, split, **options)
    else:
        result = exact_match_metrics(model, tokenizer, split, prompt, **options)
    return {**result, "primary": result[PRIMARY[split.kind]]}


def score_causal_lm(model: nn.Module, tokenizer: Any, tasks: Mapping[str, tuple[TaskPrompt, CausalSplit]], *,
                    batch_size: int, max_length: int, progress: bool = False
                    ) -> dict[str, tuple[float, list[int] | None]]:
    """Per task (primary score, each example's credit 1/0 where the score is their mean: multiple choice and
    exact match; None for perplexity), one task and one batch at a time on the model's device."""
    results = {}
    for name, (prompt, split) in tasks.items():
        metrics = task_metrics(model, tokenizer, prompt, split, batch_size=batch_size, max_length=max_length,
                               progress=progress)
        results[name] = (float(metrics["primary"]), metrics.get("credits"))
    return results


def evaluate_causal_lm(model: nn.Module, tokenizer: Any, tasks: Mapping[str, tuple[TaskPrompt, CausalSplit]], *,
                       batch_size: int, max_length: int, progress: bool = False) -> dict[str, float]:
    """Each task's primary score (`score_causal_lm`)."""
    return {name: value for name, (value, _) in score_causal_lm(model, tokenizer, tasks, batch_size=batch_size,
                                                                 max_length=max_length, progress=progress).items()}


def as_logits(scores: Tensor, counts: Sequence[int]) -> Tensor:
    """Flat per-choice scores grouped into [questions, max choices] rows, absent choices at -inf."""
    rows = list(scores.split(list(counts)))
    return torch.stack([F.pad(row, (0, max(counts) - len(row)), value=-math.inf) for row in rows])
