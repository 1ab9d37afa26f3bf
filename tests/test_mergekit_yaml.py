"""mergekit's YAML in (`mergeflow merge --config`) and out (`--print-mergekit`, the model card), on a tiny Llama
written as Hugging Face model directories. The configs are our own, in the shapes of mergekit's examples folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergeflow.errors import ConfigError
from mergeflow.merge import merge_checkpoints
from mergeflow.mergekit_config import read_mergekit, to_mergekit
from mergeflow_app.cli import main

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamas")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    paths = []
    for i in range(4):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).eval()
        if i:
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=g))
        model.save_pretrained(str(root / f"m{i}"))
        paths.append(str(root / f"m{i}"))
    return paths


def _write(tmp_path, config, name: str = "merge.yml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def _weights(directory) -> dict[str, torch.Tensor]:
    return load_file(f"{directory}/model.safetensors")


def test_a_ties_config_runs_with_mergekits_meaning(llamas, tmp_path, capsys):
    base, a, b, _ = llamas
    config = {"models": [{"model": base},
                         {"model": a, "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
                         {"model": b, "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}}],
              "merge_method": "ties", "base_model": base, "parameters": {"normalize": True, "int8_mask": True},
              "dtype": "float32", "out_dtype": "bfloat16"}
    path = _write(tmp_path, config)
    merge = read_mergekit(path)
    assert merge.method == "ties_per_tensor" and merge.expert_uris == [a, b] and merge.out_dtype == "bfloat16"
    assert merge.params == {"scaling": 1.0, "normalize": True, "rescale": False, "density": 1.0,
                            "per_expert": [{"density": [1, 0.7, 0.1], "weight": 1.0},
                                           {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}]}
    assert main(["merge", "--config", path, "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    got = _weights(tmp_path / "out")
    direct = merge_checkpoints("ties_per_tensor", base, [a, b], str(tmp_path / "direct"), merge.params,
                               device="cpu", out_dtype="bfloat16")
    expected = _weights(tmp_path / "direct")
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], expected[k]) for k in expected)
    card = (tmp_path / "out" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front == {"base_model": base, "tags": ["merge", "mergeflow"], "library_name": "transformers"}
    manifest = json.loads((tmp_path / "out" / "mergeflow.json").read_text())
    assert all(ref["sha256"] in card for ref in manifest["inputs"]) and "ties_per_tensor" in card
    assert "merge_method: ties" in card  # the equivalent mergekit YAML, back again
    assert manifest["files"]["README.md"] and direct.files["README.md"]


def test_a_gradient_slerp_over_whole_model_slices(llamas, tmp_path):
    base, a, _, _ = llamas
    t = [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"filter": "mlp", "value": [1, 0.5, 0]}, {"value": 0.5}]
    config = {"slices": [{"sources": [{"model": base, "layer_range": [0, 3]}, {"model": a, "layer_range": [0, 3]}]}],
              "merge_method": "slerp", "base_model": base, "parameters": {"t": t}, "dtype": "float32"}
    merge = read_mergekit(_write(tmp_path, config))
    assert merge.method == "slerp" and merge.expert_uris == [a] and merge.params == {"t": t}
    assert main(["merge", "--config", _write(tmp_path, config), "--out", str(tmp_path / "out")]) == 0
    got, b0, b1 = _weights(tmp_path / "out"), _weights(base), _weights(a)
    name = "model.layers.0.self_attn.q_proj.weight"  # t = 0 at the first layer: the base itself
    assert torch.equal(got[name], b0[name])
    name = "model.layers.2.mlp.up_proj.weight"  # mlp's gradient ends at 0: the base
    assert torch.equal(got[name], b0[name])
    name = "model.layers.2.self_attn.q_proj.weight"  # t = 1 at the last layer: the expert, to fp32 rounding
    assert torch.allclose(got[name], b1[name], atol=1e-6)


def test_linear_without_a_base_reads_the_first_model_as_the_base(llamas, tmp_path):
    m0, a, b, _ = llamas
    config = {"models": [{"model": m0, "parameters": {"weight": 1.0}}, {"model": a, "parameters": {"weight": 0.3}},
                         {"model": b, "parameters": {"weight": 0.5}}], "merge_method": "linear", "dtype": "float32"}
    path = _write(tmp_path, config)
    merge = read_mergekit(path)
    assert merge.method == "linear" and merge.base == m0 and merge.params["base_weight"] == 1.0
    assert main(["merge", "--config", path, "--out", str(tmp_path / "out")]) == 0
    got, w = _weights(tmp_path / "out"), [_weights(p) for p in (m0, a, b)]
    for k in got:
        assert torch.allclose(got[k], (w[0][k] + 0.3 * w[1][k] + 0.5 * w[2][k]) / 1.8, atol=1e-6), k


@pytest.mark.parametrize("change,field", [
    ({"merge_method": "passthrough"}, "merge_method"),
    ({"merge_method": "ranked_ties"}, "merge_method"),
    ({"tokenizer_source": "union"}, "tokenizer_source"),
    ({"chat_template": "chatml"}, "chat_template"),
    ({"modules": {"text": {}}}, "modules"),
    ({"parameters": {"lambda": [1, 0.5], "normalize": True}}, "parameters.lambda"),
    ({"parameters": {"t": 0.5}}, "parameters.t"),
    ({"models": [{"model": "MODEL_A", "parameters": {"weight": 1, "densty": 0.5}}]}, "models[0].parameters.densty"),
    ({"models": [{"model": "MODEL_A", "parameters": {"density": 0.5}}]}, "models[0].parameters.weight"),
    ({"models": [{"model": "org/hub-model", "parameters": {"weight": 1}}]}, "models[0].model"),
    ({"models": [{"model": "MODEL_A", "parameters": {"weight": [{"pattern": "mlp", "value": 1}]}}]},
     "models[0].parameters.weight[0].pattern"),
    ({"slices": [{"sources": [{"model": "MODEL_A", "layer_range": [0, 2]}]}], "models": None},
     "slices[0].sources[0].layer_range"),
    ({"dtpye": "float16"}, "dtpye"),
])
def test_unsupported_fields_fail_before_any_work_naming_the_field(llamas, tmp_path, capsys, change, field):
    base, a, _, _ = llamas
    config = {"models": [{"model": a, "parameters": {"weight": 1.0, "density": 0.5}}], "merge_method": "ties",
              "base_model": base, "parameters": {"normalize": True}}
    config.update(json.loads(json.dumps(change).replace("MODEL_A", a)))
    config = {k: v for k, v in config.items() if v is not None}
    path = _write(tmp_path, config)
    with pytest.raises(ConfigError, match=re.escape(field)):
        read_mergekit(path)
    assert main(["merge", "--config", path, "--out", str(tmp_path / "out")]) != 0
    assert field in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_print_mergekit_round_trips_task_arithmetic_bit_for_bit(llamas, tmp_path, capsys):
    base, a, b, c = llamas
    assert main(["merge", "--method", "task_arithmetic", "--param", "scaling=0.4", "--base", base, "--expert", a,
                 "--expert", b, "--expert", c, "--print-mergekit"]) == 0
    text = capsys.readouterr().out
    path = tmp_path / "back.yml"
    path.write_text(text)
    merge = read_mergekit(path)
    assert merge.method == "task_arithmetic_weighted" and merge.expert_uris == [a, b, c]
    merge_checkpoints("task_arithmetic", base, [a, b, c], str(tmp_path / "ours"), {"scaling": 0.4}, device="cpu")
    assert main(["merge", "--config", str(path), "--out", str(tmp_path / "back")]) == 0
    ours, back = _weights(tmp_path / "ours"), _weights(tmp_path / "back")
    assert all(torch.equal(ours[k], back[k]) for k in ours)
    assert main(["merge", "--method", "tsv", "--base", base, "--expert", a, "--expert", b, "--print-mergekit"]) == 1
    assert "no equivalent" in capsys.readouterr().out
    assert to_mergekit("ties", {"density": 0.2}, base, [a, b]) is None  # model-wide top-k: not mergekit's ties


def test_config_and_method_flags_do_not_mix(llamas, tmp_path, capsys):
    base, a, _, _ = llamas
    path = _write(tmp_path, {"models": [{"model": a, "parameters": {"weight": 1}}], "merge_method": "task_arithmetic",
                             "base_model": base})
    assert main(["merge", "--config", path, "--method", "ties", "--out", str(tmp_path / "o")]) != 0
    assert "drop --method" in capsys.readouterr().err


def _run_config(tmp_path, merges):
    return {"name": "mk", "tasks": [{"name": "election"}, {"name": "rotten_tomatoes"}],
            "data": {"probe_per_class": 2, "train": 16, "validation": 4, "test": 24},
            "finetune": {"steps": 3, "batch_size": 4, "max_length": 16, "warmup_steps": 1, "checkpoint_every": 1},
            "evaluation": {"max_length": 16}, "merges": merges,
            "storage": {"root": str(tmp_path / "store"), "cache_dir": str(tmp_path / "cache")},
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "mk"}, "device": "cpu"}


def test_a_run_config_points_at_a_mergekit_file_whose_models_name_its_tasks(tmp_path):
    from mergeflow.config import RunConfig

    mergekit = {"merge_method": "dare_ties", "base_model": "base",
                "models": [{"model": "rotten_tomatoes", "parameters": {"weight": 0.4, "density": 0.7}},
                           {"model": "election", "parameters": {"weight": [1, 0.5], "density": 0.5}}],
                "parameters": {"normalize": True}}
    path = _write(tmp_path, mergekit)
    config = RunConfig.model_validate(_run_config(tmp_path, [{"mergekit": path}]))
    spec = config.merges[0]
    assert spec.method == "dare_ties" and spec.mergekit == path and config.merge_labels() == ["dare_ties"]
    assert spec.params["per_expert"] == [{"weight": [1, 0.5], "density": 0.5}, {"weight": 0.4, "density": 0.7}]
    assert RunConfig.model_validate(config.model_dump()).merges[0] == spec  # dumped and read again: the same

    for change, field in [({"models": mergekit["models"][:1]}, "add election"),
                          ({"base_model": "/some/model"}, "base_model"),
                          ({"out_dtype": "bfloat16"}, "out_dtype"),
                          ({"models": mergekit["models"] + [{"model": "newsgroups", "parameters": {"weight": 1}}]},
                           "'newsgroups' is not a task of this run"),
                          ({"merge_method": "slerp", "parameters": {"t": 0.5},
                            "models": [{"model": "election"}, {"model": "rotten_tomatoes"}]}, "exactly 1 expert")]:
        bad = _write(tmp_path, {**mergekit, **change}, "bad.yml")
        with pytest.raises(Exception, match=re.escape(field)) as info:
            RunConfig.model_validate(_run_config(tmp_path, [{"mergekit": bad}]))
        assert "merges.0.mergekit" in str(info.value)
    with pytest.raises(Exception, match="drop method and params"):
        RunConfig.model_validate(_run_config(tmp_path, [{"mergekit": path, "method": "ties"}]))


@pytest.mark.slow
def test_the_flow_runs_a_mergekit_merge(tmp_path, prefect_harness):
    from mergeflow.config import RunConfig
    from flows.merge_flow import merge_flow

    path = _write(tmp_path, {"merge_method": "ties", "base_model": "base", "parameters": {"normalize": True},
                             "models": [{"model": "election", "parameters": {"weight": 1.0, "density": 0.3}},
                                        {"model": "rotten_tomatoes", "parameters": {"weight": 0.5, "density": 0.6}}]})
    result = merge_flow(RunConfig.model_validate(_run_config(tmp_path, [{"mergekit": path}])))
    merged = result["merged"]["ties_per_tensor"]
    manifest = json.loads((Path(merged["uri"]) / "mergeflow.json").read_text())
    assert manifest["method"] == "ties_per_tensor" and manifest["params"]["per_expert"][1]["density"] == 0.6
    assert "merge_method: ties" in (Path(merged["uri"]) / "README.md").read_text()
    assert set(result["accuracy"]["ties_per_tensor"]) == {"election", "rotten_tomatoes"}
