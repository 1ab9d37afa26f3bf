"""The statistics hooks against direct computations on tiny models, and the safetensors round trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModel, AutoTokenizer, BertConfig

from mergeflow.families.text.encoder import TextEncoder, encoder_state_dict, minilm_path, text_classification_statistics
from mergeflow.checkpoints import StateDictSource
from mergeflow.families.text.data import TextSplit
from mergeflow.errors import CheckpointError, ConfigError
from mergeflow.heads import ClassificationHead
from mergeflow.selection import ParameterSelection
from mergeflow.statistics import (collect_statistics, model_digest, open_statistics, save_statistics,
                                  validate_statistics)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(5, 7)
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture
def mlp_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 5, generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    return MLP(), [{"x": x[:3], "labels": y[:3]}, {"x": x[3:], "labels": y[3:]}], x, y


def _direct_mlp(model: MLP, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Grams from explicit activations and per-example gradients from one autograd call per example."""
    n = len(x)
    pre = x @ model.fc1.weight.T + model.fc1.bias
    pre.retain_grad()
    hidden = torch.relu(pre)
    logits = hidden @ model.fc2.weight.T + model.fc2.bias
    logits.retain_grad()
    F.cross_entropy(logits, y, reduction="sum").backward()
    out = {
        "fc1.weight::gram_in": x.T @ x / n,
        "fc2.weight::gram_in": hidden.detach().T @ hidden.detach() / n,
        "fc1.weight::gram_out": pre.grad.T @ pre.grad / n,
        "fc2.weight::gram_out": logits.grad.T @ logits.grad / n,
    }
    params = dict(model.named_parameters())
    squares = {name: torch.zeros_like(p) for name, p in params.items()}
    for i in range(n):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), list(params.values()))
        for name, grad in zip(params, grads):
            squares[name] += grad.square()
    out.update({f"{name}::fisher": total / n for name, total in squares.items()})
    model.zero_grad()
    return out


def _assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert torch.allclose(got[key], want[key].detach(), atol=atol, rtol=1e-5), key


def test_mlp_grams_and_empirical_fisher_match_direct_computation(mlp_data):
    model, batches, x, y = mlp_data
    stats = collect_statistics(model, batches, lambda b: model(b["x"]))
    _assert_close(stats.tensors, _direct_mlp(model, x, y))
    assert stats.metadata["examples"] == "8" and stats.metadata["fisher"] == "empirical"
    assert stats.metadata["model_digest"] == model_digest(model)
    assert all(p.grad is None for p in model.parameters()) and model.training


def test_example_cap_kinds_and_selection(mlp_data):
    model, batches, x, y = mlp_data
    stats = collect_statistics(model, batches, lambda b: model(b["x"]), max_examples=5)
    _assert_close(stats.tensors, _direct_mlp(model, x[:5], y[:5]))
    assert stats.metadata["examples"] == "5" and stats.metadata["max_examples"] == "5"
    grams = collect_statistics(model, batches, lambda b: model(b["x"]), kinds=("gram_in",),
                               selection=ParameterSelection(exclude=("fc2",)))
    assert set(grams.tensors) == {"fc1.weight::gram_in"}
    with pytest.raises(ValueError, match="kinds"):
        collect_statistics(model, batches, lambda b: model(b["x"]), kinds=("hessian",))


def test_sampled_fisher_draws_labels_from_the_model_with_a_seed(mlp_data):
    model, batches, x, _ = mlp_data
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        drawn = torch.cat([torch.multinomial(torch.softmax(model(x[i:i + 1]), -1), 1, generator=g)[:, 0]
                           for i in range(len(x))])
    sampled = collect_statistics(model, batches, lambda b: model(b["x"]), fisher="sampled", seed=7)
    direct = _direct_mlp(model, x, drawn)
    _assert_close({k: v for k, v in sampled.tensors.items() if k.endswith("::fisher")},
                  {k: v for k, v in direct.items() if k.endswith("::fisher")})
    again = collect_statistics(model, batches, lambda b: model(b["x"]), fisher="sampled", seed=7)
    assert all(torch.equal(again.tensors[k], v) for k, v in sampled.tensors.items())
    assert sampled.metadata["fisher"] == "sampled"


def _tiny_bert(vocab_size: int = 100):
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        vocab_size=vocab_size)
    bert = AutoModel.from_config(config)
    head = torch.randn(3, 32)

    def logits_fn(batch):
        hidden = bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return ((hidden * mask).sum(1) / mask.sum(1)) @ head.T

    return bert, logits_fn


def test_bert_grams_leave_padding_out():
    bert, logits_fn = _tiny_bert()
    lengths = [6, 3, 4]
    ids = torch.randint(1, 100, (3, 6), generator=torch.Generator().manual_seed(2))
    mask = (torch.arange(6) < torch.tensor(lengths)[:, None]).long()
    labels = torch.tensor([0, 2, 1])
    padded = collect_statistics(bert, [{"input_ids": ids * mask, "attention_mask": mask, "labels": labels}],
                                logits_fn)
    alone = collect_statistics(bert, [{"input_ids": ids[i:i + 1, :n], "attention_mask": mask[i:i + 1, :n],
                                       "labels": labels[i:i + 1]} for i, n in enumerate(lengths)], logits_fn)
    _assert_close(padded.tensors, alone.tensors, atol=1e-5)
    # direct: the query projection reads the embedding output; its Gram averages over the 13 real tokens only
    bert.eval()
    with torch.no_grad():
        embedded = bert(input_ids=ids * mask, attention_mask=mask, output_hidden_states=True).hidden_states[0]
    rows = embedded[mask.bool()]
    assert rows.shape[0] == 13
    key = "encoder.layer.0.attention.self.query.weight"
    assert torch.allclose(padded.tensors[f"{key}::gram_in"], rows.T @ rows / 13, atol=1e-5)
    # names are the model's own; the pooler is never on the loss path: inputs seen, no output gradient
    names = set(bert.state_dict())
    assert all(k.split("::")[0] in names for k in padded.tensors)
    assert "pooler.dense.weight::gram_in" in padded.tensors and "pooler.dense.weight::gram_out" not in padded.tensors
    assert not padded.tensors["pooler.dense.weight::fisher"].any()
    assert padded.tensors[f"{key}::fisher"].any()


def test_text_classification_adapter_names_keys_as_the_checkpoint():
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    bert, _ = _tiny_bert(tokenizer.vocab_size)
    encoder = TextEncoder(bert)
    head = ClassificationHead(torch.randn(3, 32, generator=torch.Generator().manual_seed(3)), torch.zeros(3), 5.0)
    split = TextSplit(["a rather long text about hockey and baseball games", "short", "cars and motorcycles",
                       "space", "never read: past the cap"], [0, 1, 2, 1, 0])
    stats = text_classification_statistics(encoder, tokenizer, head, split, max_examples=4, batch_size=3)
    assert stats.metadata["examples"] == "4"
    assert {k.split("::")[0] for k in stats.tensors} <= set(encoder_state_dict(encoder))

    def one_text(i):
        inputs = tokenizer([split.texts[i]], truncation=True, max_length=64, return_tensors="pt")
        return {**inputs, "labels": torch.tensor([split.labels[i]])}

    direct = collect_statistics(bert, [one_text(i) for i in range(4)],
                                lambda b: head.logits(encoder(b["input_ids"], b["attention_mask"])))
    _assert_close(stats.tensors, direct.tensors, atol=1e-5)


def test_round_trip_through_safetensors(tmp_path, mlp_data):
    model, batches, _, _ = mlp_data
    stats = collect_statistics(model, batches, lambda b: model(b["x"]))
    path = tmp_path / "stats" / "expert.statistics.safetensors"
    digest = save_statistics(stats, path)
    with open_statistics(str(path)) as opened:
        assert opened.digest == digest and opened.metadata == stats.metadata
        assert set(opened.keys()) == set(stats.tensors)
        assert all(torch.equal(opened.get(k), v) for k, v in stats.tensors.items())


def test_open_and_validate_reject_what_is_not_a_fit(tmp_path, mlp_data):
    model, _, _, _ = mlp_data
    weights = tmp_path / "model.safetensors"
    save_file({k: v.detach() for k, v in model.state_dict().items()}, str(weights))
    with pytest.raises(CheckpointError, match="not a statistics file"):
        open_statistics(str(weights))
    base = StateDictSource(model.state_dict(), "base")
    good = {"fc1.weight::gram_in": torch.eye(5), "fc1.weight::gram_out": torch.eye(7), "fc1.bias::fisher": torch.ones(7)}
    validate_statistics(base, [StateDictSource(good, "s")], 1)
    with pytest.raises(ConfigError, match="2 statistics files for 1 experts"):
        validate_statistics(base, [StateDictSource(good, "s"), StateDictSource(good, "t")], 1)
    bad_shape = StateDictSource({"fc1.weight::gram_in": torch.eye(7)}, "bad.safetensors")
    with pytest.raises(CheckpointError, match=r"bad.safetensors.*fc1.weight::gram_in.*expected \(5, 5\)"):
        validate_statistics(base, [bad_shape], 1)
    unknown = StateDictSource({"fc9.weight::fisher": torch.ones(1)}, "odd.safetensors")
    with pytest.raises(CheckpointError, match="odd.safetensors.*'fc9.weight', which the base"):
        validate_statistics(base, [unknown], 1)
    with pytest.raises(CheckpointError, match="2-D weight"):
        validate_statistics(base, [StateDictSource({"fc1.bias::gram_in": torch.ones(1, 1)}, "s")], 1)



def _bert_batches(batches: int = 3, size: int = 4, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        lengths = torch.randint(2, 9, (size,), generator=g)
        mask = (torch.arange(8) < lengths[:, None]).long()
        ids = torch.randint(1, 100, (size, 8), generator=g) * mask  # id 0 (BERT's padding_idx) on padding
        ids[0, 1] = ids[0, 0]  # a token twice in one example: its embedding row's gradient sums both positions
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (size,), generator=g)})
    return out


def _count_hooked_backwards(monkeypatch) -> list[int]:
    from mergeflow import per_example

    calls = [0]
    original = per_example.SquaredGradients.backward

    def counted(self, loss):
        calls[0] += 1
        return original(self, loss)

    monkeypatch.setattr(per_example.SquaredGradients, "backward", counted)
    return calls


@pytest.mark.parametrize("size", [4, 7])
@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_batched_fisher_equals_one_example_at_a_time(monkeypatch, fisher, size):
    """Embeddings (repeated ids, padding_idx, position embeddings broadcast over the batch), LayerNorms, Linears
    and biases: the Fisher taken by hooks from whole batches equals one backward per example (the first batch's
    first 4 examples checked one at a time, its rest by hooks)."""
    from mergeflow import per_example

    bert, logits_fn = _tiny_bert()
    batches = _bert_batches(size=size)
    calls = _count_hooked_backwards(monkeypatch)
    fast = collect_statistics(bert, batches, logits_fn, fisher=fisher, seed=3)
    assert calls[0] == (3 if size == 4 else 4)  # the trial (and the first batch's rest), then the two later batches
    monkeypatch.setattr(per_example, "supported", lambda model: False)
    slow = collect_statistics(bert, batches, logits_fn, fisher=fisher, seed=3)
    assert calls[0] == (3 if size == 4 else 4)
    _assert_close(fast.tensors, slow.tensors, atol=1e-6)
    assert fast.tensors["embeddings.word_embeddings.weight::fisher"][0].eq(0).all()  # padding_idx: no gradient
    assert fast.tensors["embeddings.position_embeddings.weight::fisher"][:8].gt(0).all()
    assert fast.metadata == slow.metadata


def test_models_the_hooks_cannot_split_run_one_example_at_a_time(monkeypatch, mlp_data):
    """A layer called twice per forward, and a parameter outside Linear/Embedding/LayerNorm: exact all the same."""
    from mergeflow import per_example

    model, batches, x, y = mlp_data
    calls = _count_hooked_backwards(monkeypatch)

    class Twice(MLP):
        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x))) + self.fc2(torch.relu(self.fc1(x))) * 0.5

    twice = Twice()
    twice.load_state_dict(model.state_dict())
    stats = collect_statistics(twice, batches, lambda b: twice(b["x"]), kinds=("fisher",))
    assert calls[0] == 0  # the trial's forward raised Unsupported: every batch one example at a time
    params = dict(twice.named_parameters())
    for name, p in params.items():
        want = sum(torch.autograd.grad(F.cross_entropy(twice(x[i:i + 1]), y[i:i + 1]), [p])[0].square()
                   for i in range(len(x))) / len(x)
        assert torch.allclose(stats.tensors[f"{name}::fisher"], want, atol=1e-6, rtol=1e-5), name

    class Scaled(MLP):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(1.5))

        def forward(self, x):
            return super().forward(x) * self.scale

    scaled = Scaled()
    assert not per_example.supported(scaled) and per_example.supported(model)
    stats = collect_statistics(scaled, batches, lambda b: scaled(b["x"]), kinds=("fisher",))
    assert calls[0] == 0 and stats.tensors["scale::fisher"] > 0


def test_a_weight_used_outside_its_module_is_caught_by_the_first_batch_check(monkeypatch, mlp_data):
    """The hooks see only the module's own call; the first batch's comparison with one example at a time finds the
    difference and the whole pass runs one example at a time."""
    model, batches, x, y = mlp_data
    calls = _count_hooked_backwards(monkeypatch)

    class Reused(MLP):
        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x))) + F.linear(x, self.fc1.weight)[:, :3]

    reused = Reused()
    stats = collect_statistics(reused, batches, lambda b: reused(b["x"]), kinds=("fisher",))
    assert calls[0] == 1  # the trial only
    weight = reused.fc1.weight
    want = sum(torch.autograd.grad(F.cross_entropy(reused(x[i:i + 1]), y[i:i + 1]), [weight])[0].square()
               for i in range(len(x))) / len(x)
    assert torch.allclose(stats.tensors["fc1.weight::fisher"], want, atol=1e-6, rtol=1e-5)


def test_the_first_batch_check_ignores_rounding_noise_but_not_differences():
    from mergeflow.statistics import fishers_agree

    reference = {"w": torch.tensor([1e-2, 3e-3]), "key_bias": torch.tensor([1e-20, 0.0])}
    assert fishers_agree({"w": reference["w"] * (1 + 1e-5), "key_bias": torch.tensor([3e-20, 1e-21])}, reference)
    assert not fishers_agree({"w": torch.tensor([1e-2, 2e-3]), "key_bias": reference["key_bias"]}, reference)
    assert not fishers_agree({"w": reference["w"], "key_bias": torch.tensor([1e-6, 0.0])}, reference)
