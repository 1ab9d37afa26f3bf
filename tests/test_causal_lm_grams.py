"""Grams of GPT-2's Conv1D layers (weight stored [in, out], y = x @ W + b) on tiny real models built on the fly
(a tokenizer learnt from real movie reviews): every c_attn, c_proj and c_fc weight gets the Gram of its input, the
statistics list these weights as stored [in, out], and RegMean (and MaTS's RegMean objective) multiply them by the
Gram from the left, W* = (sum G_i)^-1 sum G_i W_i, checked against a direct computation; an nn.Linear weight of a
tiny Llama keeps W* = (sum W_i G_i)(sum G_i)^-1, and its statistics carry no layout metadata (files as before)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergeflow.checkpoints.reader import StateDictSource
from mergeflow.errors import CheckpointError
from mergeflow.families.causal_lm.data import TextSplit
from mergeflow.families.causal_lm.model_dir import causal_lm_state_dict, load_causal_lm
from mergeflow.families.causal_lm.scoring import TaskPrompt
from mergeflow.families.causal_lm.training import causal_lm_statistics
from mergeflow.families.text.data import SplitSizes, load_text_task
from mergeflow.merge import merge_state_dicts
from mergeflow.statistics import (
    GRAM_IN,
    IN_OUT,
    Statistics,
    open_statistics,
    save_statistics,
    statistic_key,
    validate_statistics,
)
from tiny_causal_lm import tiny_causal_lm_dir

pytestmark = pytest.mark.usefixtures("single_threaded")
PLAIN = {"reduce_non_diagonal_ratio": 1.0}  # RegMean's closed form itself, no off-diagonal shrink


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    reviews = load_text_task("rotten_tomatoes", cache_dir=tmp_path_factory.getbasetemp() / "wheels",
                             sizes=SplitSizes(probe_per_class=1, train=200, validation=4, test=4))
    return reviews.splits["train"].texts


def _experts(directory: Path, texts: list[str]) -> tuple[dict, list[dict], list[Statistics]]:
    """The base's weights, two experts (the base plus seeded noise) and each expert's Grams on its own texts."""
    base_model, tokenizer = load_causal_lm(directory)
    base = causal_lm_state_dict(base_model)
    experts, stats = [], []
    for i in range(2):
        generator = torch.Generator().manual_seed(i)
        expert = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in base.items()}
        model, _ = load_causal_lm(directory, expert)
        stats.append(causal_lm_statistics(model, tokenizer, TaskPrompt("perplexity"),
                                          TextSplit(texts[60 * i:60 * i + 60]), kinds=(GRAM_IN,), max_examples=60,
                                          batch_size=8, max_length=32))
        experts.append(expert)
    return base, experts, stats


def _grams(stats: list[Statistics], weight: str) -> list[torch.Tensor]:
    return [s.tensors[statistic_key(weight, GRAM_IN)].double() for s in stats]


@pytest.fixture(scope="module")
def gpt2(texts: list[str], tmp_path_factory: pytest.TempPathFactory):
    return _experts(tiny_causal_lm_dir(tmp_path_factory.mktemp("gpt2") / "base", "gpt2", texts[:200]), texts)


def test_every_conv1d_weight_of_gpt2_has_the_gram_of_its_input_and_is_listed_in_out(gpt2) -> None:
    base, _, stats = gpt2
    conv1d = sorted(f"transformer.h.{i}.{layer}.weight" for i in range(2)
                    for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    for s in stats:
        assert sorted(key.split("::")[0] for key in s.tensors) == conv1d  # the LM head (tied to wte) has none
        assert json.loads(s.metadata[IN_OUT]) == conv1d
        for weight in conv1d:
            inputs = base[weight].shape[0]  # Conv1D: [in, out]
            gram = s.tensors[statistic_key(weight, GRAM_IN)]
            assert gram.shape == (inputs, inputs) and torch.allclose(gram, gram.T) and gram.diagonal().min() > 0


def test_regmean_of_two_gpt2_experts_is_the_closed_form_with_the_gram_on_the_left(gpt2, tmp_path: Path) -> None:
    base, experts, stats = gpt2
    merged = merge_state_dicts("regmean", base, experts, PLAIN, statistics=stats)
    for weight in ("transformer.h.0.mlp.c_fc.weight", "transformer.h.1.attn.c_proj.weight"):  # [32, 128], square
        grams, weights = _grams(stats, weight), [e[weight].double() for e in experts]
        expected = torch.linalg.solve(sum(grams), sum(g @ w for g, w in zip(grams, weights)))
        assert torch.allclose(merged[weight].double(), expected, rtol=1e-4, atol=1e-5), weight
    square = "transformer.h.1.attn.c_proj.weight"  # its shape cannot tell the layouts apart: the metadata does
    grams, weights = _grams(stats, square), [e[square].double() for e in experts]
    as_if_linear = torch.linalg.solve(sum(grams), sum(g @ w.T for g, w in zip(grams, weights))).T
    assert not torch.allclose(merged[square].double(), as_if_linear, rtol=1e-3, atol=1e-3)
    # through files, as the flow reads them: the layout survives and the shapes are checked against it
    paths = [tmp_path / f"statistics-{i}.safetensors" for i in range(2)]
    for s, path in zip(stats, paths):
        save_statistics(s, path)
    opened = [open_statistics(str(path)) for path in paths]
    validate_statistics(StateDictSource(base, "base"), opened, 2)
    assert json.loads(opened[0].metadata[IN_OUT]) == json.loads(stats[0].metadata[IN_OUT])
    unlisted = StateDictSource(stats[0].tensors, "unlisted.safetensors")  # [32, 32] Grams of [32, 96] c_attn ...
    with pytest.raises(CheckpointError, match=r"unlisted\.safetensors.*c_attn\.weight.*expected \(96, 96\)"):
        validate_statistics(StateDictSource(base, "base"), [unlisted], 1)


def test_a_linear_layer_of_a_tiny_llama_merges_as_before(texts: list[str], tmp_path: Path) -> None:
    base, experts, stats = _experts(tiny_causal_lm_dir(tmp_path / "llama", "llama", texts[:200]), texts)
    assert all(IN_OUT not in s.metadata for s in stats)  # no [in, out] weight: the files of before
    merged = merge_state_dicts("regmean", base, experts, PLAIN, statistics=stats)
    weight = "model.layers.0.mlp.up_proj.weight"  # nn.Linear [out 64, in 32]
    grams, weights = _grams(stats, weight), [e[weight].double() for e in experts]
    expected = torch.linalg.solve(sum(grams), sum(g @ w.T for g, w in zip(grams, weights))).T  # (sum W G)(sum G)^-1
    assert merged[weight].shape == (64, 32)
    assert torch.allclose(merged[weight].double(), expected, rtol=1e-4, atol=1e-5)


def test_mats_regmean_objective_solves_each_layout_in_a_group_of_both() -> None:
    """Two square weights of one shape, one stored [in, out] and one [out, in], solved as one group by MaTS's CG:
    each reaches its own closed form (and RegMean's)."""
    generator = torch.Generator().manual_seed(0)
    base = {name: torch.randn(6, 6, generator=generator) for name in ("conv.weight", "linear.weight")}
    experts = [{k: v + torch.randn(v.shape, generator=generator) for k, v in base.items()} for _ in range(2)]
    stats = []
    for _ in range(2):
        tensors = {}
        for name in base:
            x = torch.randn(40, 6, generator=generator)
            tensors[statistic_key(name, GRAM_IN)] = x.T @ x / 40
        stats.append(Statistics(tensors, {IN_OUT: json.dumps(["conv.weight"])}))
    grams = {name: _grams(stats, name) for name in base}
    weights = {name: [e[name].double() for e in experts] for name in base}
    expected = {
        "conv.weight": torch.linalg.solve(sum(grams["conv.weight"]),
                                          sum(g @ w for g, w in zip(grams["conv.weight"], weights["conv.weight"]))),
        "linear.weight": torch.linalg.solve(sum(grams["linear.weight"]), sum(
            g @ w.T for g, w in zip(grams["linear.weight"], weights["linear.weight"]))).T}
    mats = merge_state_dicts("mats", base, experts, {"objective": "regmean", "max_iter": 500, "tol": 1e-12,
                                                     "precision": "float64", "group_mb": 1.0}, statistics=stats)
    regmean = merge_state_dicts("regmean", base, experts, PLAIN, statistics=stats)
    for name, value in expected.items():
        assert torch.allclose(mats[name].double(), value, rtol=1e-4, atol=1e-5), name
        assert torch.allclose(regmean[name].double(), value, rtol=1e-4, atol=1e-5), name


def test_a_bad_or_disagreeing_layout_list_names_the_statistics() -> None:
    from mergeflow.errors import ConfigError
    from mergeflow.statistics import in_out_weights

    gram = {statistic_key("w.weight", GRAM_IN): torch.eye(2)}
    listed = StateDictSource(gram, "a.safetensors", {IN_OUT: '["w.weight"]'})
    assert in_out_weights([listed, StateDictSource(gram, "b.safetensors", {IN_OUT: '["w.weight"]'})]) == {"w.weight"}
    with pytest.raises(CheckpointError, match=r"bad\.safetensors.*'in_out' metadata"):
        in_out_weights([StateDictSource(gram, "bad.safetensors", {IN_OUT: "w.weight"})])
    with pytest.raises(ConfigError, match=r"plain\.safetensors and a\.safetensors disagree.*'w\.weight'"):
        in_out_weights([listed, StateDictSource(gram, "plain.safetensors")])
