"""Run configs: strict, with errors naming the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergeflow.config import RunConfig, load_run_config
from mergeflow.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_are_valid():
    config = load_run_config(ROOT / "configs" / "demo.yaml")
    assert {"average", "task_arithmetic", "ties", "doge_ta", "tsv", "regmean"} == {m.method for m in config.merges}
    assert len(config.tasks) >= 4
    full = load_run_config(ROOT / "configs" / "demo-full.yaml")  # every method of the catalogue but DARE
    from mergeflow.mergekit_config import GTA, OTHER
    from mergeflow.methods import METHODS, method_class

    mergekits = {name for name, _, _ in GTA.values()} | set(OTHER.values())
    assert set(METHODS) - {"dare"} - mergekits <= {m.method for m in full.merges}
    # mergekit's methods, from mergekit files: every one that merges the demo's four experts
    demo_mergekit = load_run_config(ROOT / "configs" / "demo-mergekit.yaml")
    four = {m for m in mergekits if (method_class(m).expert_count[1] or 4) >= 4} - {"dare_linear", "della_linear",
                                                                                    "breadcrumbs_ties"}
    assert four <= {m.method for m in demo_mergekit.merges}
    assert [t.name for t in demo_mergekit.tasks] == [t.name for t in full.tasks]
    atm = load_run_config(ROOT / "configs" / "atm.yaml")
    assert atm.atm is not None and [t.name for t in atm.tasks] == [t.name for t in full.tasks]


@pytest.mark.parametrize("text,match", [
    ("tasks: [{name: election}]\nmerges: [{method: average}]\nfinetune: {stepz: 3}\n", r"finetune\.stepz"),
    ("tasks: [{name: election}]\nmerges: [{method: magic}]\n", r"merges\.0\.method"),
    ("tasks: [{name: election}]\nmerges: [{method: ties, params: {k: 0.2}}]\n", r"'ties'.*k"),
    ("tasks: [{name: nope}]\nmerges: [{method: average}]\n", r"'nope' is not a built-in hf_text task"),
    ("tasks: [{name: election}, {name: election}]\nmerges: [{method: average}]\n", "twice"),
    ("tasks: []\nmerges: [{method: average}]\n", r"tasks"),
    ("tasks: [{name: election}\n", "invalid YAML"),
    ("name: ../../escape\ntasks: [{name: election}]\nmerges: [{method: average}]\n", r"name: String should match"),
])
def test_bad_configs_name_file_and_field(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_run_config(path)
    assert "bad.yaml" in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_run_config(tmp_path / "absent.yaml")


def test_schema_offers_methods_as_a_dropdown_with_descriptions():
    schema = RunConfig.model_json_schema()
    spec = schema["$defs"]["MergeSpec"]["properties"]["method"]
    assert set(spec["enum"]) >= {"average", "task_arithmetic", "ties", "dare"}
    for definition in schema["$defs"].values():
        for name, prop in definition.get("properties", {}).items():
            assert prop.get("description"), f"{definition['title']}.{name} has no description"


def test_every_field_of_the_flow_parameter_is_described_and_methods_are_a_dropdown():
    """The Prefect UI renders RunConfig's JSON schema as the form of a custom run."""
    from mergeflow.config import RunConfig
    from mergeflow.methods import METHODS

    schema = RunConfig.model_json_schema()
    models = {"RunConfig": schema, **schema.get("$defs", {})}
    undescribed = [f"{model}.{field}" for model, definition in models.items()
                   for field, spec in definition.get("properties", {}).items() if "description" not in spec]
    assert not undescribed, undescribed
    assert set(models["MergeSpec"]["properties"]["method"]["enum"]) == set(METHODS) | {"auto"}


def test_builtin_tasks_table_matches_the_families() -> None:
    from mergeflow.config import BUILTIN_TASKS
    from mergeflow.families import FAMILIES

    assert set(BUILTIN_TASKS) == set(FAMILIES)
    for name, cls in FAMILIES.items():
        assert tuple(sorted(BUILTIN_TASKS[name])) == tuple(sorted(cls().builtin_tasks)), name


_FAMILY_CONFIGS = {
    "hf_text": {"tasks": [{"name": "election"}]},
    "open_clip": {"model": {"family": "open_clip", "pretrained": "s3://b/clip"}, "tasks": [{"name": "digits"}]},
    "hf_clip": {"model": {"family": "hf_clip", "pretrained": "s3://b/clip"}, "tasks": [{"name": "mnist"}]},
    "seq2seq": {"model": {"family": "seq2seq", "pretrained": "s3://b/t5"},
                "tasks": [{"name": "cola", "dataset": "s3://b/cola"}]},
    "causal_lm": {"model": {"family": "causal_lm", "pretrained": "s3://b/llm"},
                  "tasks": [{"name": "wiki", "dataset": "s3://b/wiki"}]},
}


def _family_config(family: str, **extra) -> RunConfig:
    return RunConfig.model_validate({**_FAMILY_CONFIGS[family], "merges": [{"method": "average"}], **extra})


@pytest.mark.parametrize("family", ["hf_text", "open_clip", "hf_clip", "seq2seq"])
def test_an_unset_max_length_of_the_other_families_dumps_and_fingerprints_as_before(family: str) -> None:
    """64 tokens, byte for byte the dump of before (an explicit 64), so every stored fingerprint is unchanged: the
    evaluation location below was computed before the causal_lm default existed."""
    from mergeflow.stages.evaluate import evaluation_location
    from mergeflow.stages.refs import ObjectRef

    config = _family_config(family)
    assert config.evaluation.model_dump_json() == '{"batch_size":64,"max_length":64}'
    assert config.model_dump_json() == _family_config(family, evaluation={"max_length": 64}).model_dump_json()
    assert config.model_dump(mode="json", exclude_defaults=True).get("evaluation") is None  # deployment parameters
    ref = lambda s: ObjectRef(uri=f"s3://b/{s}", sha256=s * 64)  # noqa: E731
    uri = evaluation_location(None, ref("a"), {"t": (ref("b"), ref("c"))}, config.evaluation, "s3://b/store")
    assert uri == "s3://b/store/evaluations/fc709aa973964268.json"


def test_causal_lm_evaluation_defaults_to_512_tokens_unless_set() -> None:
    assert _family_config("causal_lm").evaluation.max_length == 512
    assert _family_config("causal_lm", evaluation={"batch_size": 8}).evaluation.model_dump() == \
        {"batch_size": 8, "max_length": 512}
    assert _family_config("causal_lm", evaluation={"max_length": 128}).evaluation.max_length == 128
    assert _family_config("causal_lm", evaluation={"max_length": 64}).evaluation.max_length == 64
    # filled in at validation: the dump carries it and validates back to itself
    dumped = _family_config("causal_lm").model_dump(mode="json")
    assert dumped["evaluation"]["max_length"] == 512 and RunConfig.model_validate(dumped).evaluation.max_length == 512
    description = RunConfig.model_json_schema()["$defs"]["EvalConfig"]["properties"]["max_length"]["description"]
    assert "512" in description and "causal_lm" in description  # the Prefect form says so


@pytest.mark.parametrize("family,given,expected", [("causal_lm", None, 512), ("causal_lm", 128, 128),
                                                   ("hf_text", None, 64), ("seq2seq", None, 64)])
def test_merge_data_config_max_length_follows_the_family(family: str, given: int | None, expected: int) -> None:
    from mergeflow.config import MergeDataConfig

    raw = {"family": family, "model": "m", "tasks": [{"name": "a", "dataset": "d", "head": "h"}]}
    config = MergeDataConfig.model_validate(raw if given is None else {**raw, "max_length": given})
    assert config.max_length == expected
