"""`mergeflow merge --data`: data-aware methods from the command line on the real MiniLM and real texts, with
statistics computed once and reused, and clear errors for a wrong data config before any model runs."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mergeflow.families.text.encoder import minilm_path
from mergeflow_app.cli import main
from mergeflow.families.text.data import SplitSizes, load_text_task, save_text_task
from mergeflow.heads import ClassificationHead


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A base (MiniLM), two experts near it, two real task datasets with heads, and a data config."""
    root = tmp_path_factory.mktemp("merge-data")
    base = load_file(str(minilm_path() / "model.safetensors"))
    experts = []
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        sd = {k: v + 0.01 * v.abs().mean() * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
              for k, v in base.items()}
        path = root / f"expert{i}.safetensors"
        save_file(sd, str(path))
        experts.append(str(path))
    tasks = []
    sizes = SplitSizes(probe_per_class=1, train=2, validation=4, test=4)
    for i, name in enumerate(("election", "rotten_tomatoes")):
        task = load_text_task(name, cache_dir=tmp_path_factory.getbasetemp() / "wheels", sizes=sizes)
        save_text_task(task, root / name)
        g = torch.Generator().manual_seed(10 + i)
        head = ClassificationHead(torch.randn(len(task.class_names), 384, generator=g), torch.zeros(len(task.class_names)), 10.0)
        head.save(root / f"{name}-head.safetensors")
        tasks.append({"name": name, "dataset": str(root / name), "head": str(root / f"{name}-head.safetensors")})
    config = {"model": str(minilm_path()), "tasks": tasks, "max_length": 16, "batch_size": 2,
              "statistics": {"max_examples": 3, "max_length": 16, "batch_size": 2}}
    (root / "data.yaml").write_text(yaml.safe_dump(config))
    return root, str(minilm_path() / "model.safetensors"), experts, config


def _merge(root, base, experts, method, out, *extra):
    argv = ["merge", "--method", method, "--base", base, "--out", str(root / out), "--device", "cpu",
            "--data", str(root / "data.yaml"), "--store", str(root / "store"), *extra]
    for expert in experts:
        argv += ["--expert", expert]
    return main(argv)


def test_adamerging_learns_on_the_unlabeled_texts(inputs, monkeypatch, tmp_path):
    root, base, experts, _ = inputs
    monkeypatch.setenv("MERGEFLOW_CACHE", str(tmp_path / "cache"))
    assert _merge(root, base, experts, "adamerging", "ada", "--param", "steps=3", "--param", "granularity=task") == 0
    manifest = json.loads((root / "ada" / "mergeflow.json").read_text())
    assert len(manifest["state"]["losses"]) == 3
    coefficients = {tuple(c) for c in manifest["state"]["coefficients"].values()}
    assert len(coefficients) == 1 and next(iter(coefficients)) != (0.3, 0.3)  # task-wise, and it moved


def test_regmean_computes_statistics_once_and_reuses_them(inputs, monkeypatch, tmp_path):
    """As the flow's statistics stage: stored beside each expert under a key of its inputs, read again by a rerun."""
    root, base, experts, _ = inputs
    monkeypatch.setenv("MERGEFLOW_CACHE", str(tmp_path / "cache"))
    before = set(root.glob("statistics-*.safetensors"))
    assert _merge(root, base, experts, "regmean", "regmean") == 0
    stats = sorted(root.glob("statistics-*.safetensors"))
    assert len(stats) == 2 and len(set(stats) - before) in (0, 2)  # one per expert (earlier tests may have made them)
    stamps = [p.stat().st_mtime_ns for p in stats]
    manifest = json.loads((root / "regmean" / "mergeflow.json").read_text())
    statistics = [i["uri"] for i in manifest["inputs"] if i["role"] == "statistics"]
    assert sorted(statistics) == [str(p) for p in stats]
    assert _merge(root, base, experts, "regmean", "regmean", "--overwrite") == 0
    assert [p.stat().st_mtime_ns for p in sorted(root.glob("statistics-*.safetensors"))] == stamps


def test_wrong_data_configs_are_named_before_any_model_runs(inputs, monkeypatch, tmp_path, capsys):
    root, base, experts, config = inputs
    monkeypatch.setenv("MERGEFLOW_CACHE", str(tmp_path / "cache"))

    def run_with(changed, method="regmean"):
        (root / "bad.yaml").write_text(yaml.safe_dump(changed))
        before = set(root.glob("statistics-*"))
        argv = ["merge", "--method", method, "--base", base, "--out", str(tmp_path / "out"), "--device", "cpu",
                "--data", str(root / "bad.yaml"), "--store", str(tmp_path / "store")]
        assert main(argv + [a for e in experts for a in ("--expert", e)]) == 2
        assert not (tmp_path / "out").exists() and set(root.glob("statistics-*")) == before
        assert not (tmp_path / "store").exists()
        return capsys.readouterr().err

    assert "2 experts" in run_with({**config, "tasks": config["tasks"][:1]})
    missing = {**config, "tasks": [{**config["tasks"][0], "dataset": str(tmp_path / "nowhere")}, config["tasks"][1]]}
    assert "tasks.0.dataset" in run_with(missing)
    swapped = {**config, "tasks": [{**config["tasks"][0], "head": config["tasks"][1]["head"]}, config["tasks"][1]]}
    err = run_with(swapped)
    assert "tasks.0.head" in err and "3 classes" in err
    assert "reads no task data" in run_with(config, method="task_arithmetic")
    assert "tasks.0.name" in run_with({**config, "tasks": [{"dataset": "x", "head": "y"}] * 2})


@pytest.fixture
def validation_only(monkeypatch, tmp_path):
    """A fresh content cache, and a text-data reader that fails the test when a test split is opened."""
    import mergeflow.families.text.data as text_tasks

    monkeypatch.setenv("MERGEFLOW_CACHE", str(tmp_path / "cache"))
    original = text_tasks.read_split

    def reading(directory, split):
        assert split != "test", "selection opened a test split"
        return original(directory, split)

    monkeypatch.setattr(text_tasks, "read_split", reading)


def test_tune_picks_coefficients_on_validation_only(inputs, validation_only, tmp_path, capsys):
    root, base, experts, _ = inputs
    argv = ["merge", "--method", "task_arithmetic", "--base", base, "--out", str(tmp_path / "tuned"), "--device",
            "cpu", "--tune", str(root / "data.yaml"), "--grid", "scaling=0.2,1.0", "--store", str(tmp_path / "s")]
    for expert in experts:
        argv += ["--expert", expert]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("validation avg") == 2 and out.count("<- chosen") == 1
    manifest = json.loads((tmp_path / "tuned" / "mergeflow.json").read_text())
    chosen_line = next(line for line in out.splitlines() if "<- chosen" in line)
    assert manifest["params"]["scaling"] in (0.2, 1.0)
    assert chosen_line.strip().startswith(f'{{"scaling": {manifest["params"]["scaling"]}}}')


def test_auto_searches_methods_on_validation_only(inputs, validation_only, tmp_path, capsys):
    root, base, experts, _ = inputs
    argv = ["merge", "--method", "auto", "--candidates", "task_arithmetic,tsv,regmean", "--base", base, "--out",
            str(tmp_path / "auto"), "--device", "cpu", "--tune", str(root / "data.yaml"), "--store", str(tmp_path / "s")]
    for expert in experts:
        argv += ["--expert", expert]
    assert main(argv) == 0
    out = capsys.readouterr().out
    board = [line for line in out.splitlines() if line.startswith("  task_arithmetic(") or
             line.startswith("  tsv(") or line.startswith("  regmean(")]
    assert len(board) >= 10 + 6 + 4 and sum("<- chosen" in line for line in board) == 1  # every candidate listed (and any tried past a grid edge)
    assert "rung 0: 20 candidates" in out
    manifest = json.loads((tmp_path / "auto" / "mergeflow.json").read_text())
    chosen = next(line for line in board if "<- chosen" in line).split()[0]
    assert chosen.startswith(manifest["method"] + "(")
    if manifest["method"] == "regmean":  # a data-aware winner is merged with the statistics the search used
        assert any(ref["role"] == "statistics" for ref in manifest["inputs"])


def test_auto_searches_a_learned_method_on_validation_inputs_and_writes_the_searched_point(
        inputs, validation_only, tmp_path, capsys, monkeypatch):
    """AdaMerging as a candidate of the CLI's search: it learns once per point scored (on the validation inputs;
    the test split is never opened), its merge is kept for the later rungs and is what the output holds, bit for
    bit."""
    from safetensors.torch import load_file

    import mergeflow.search as search
    import mergeflow.stages.sweep as sweep_stage
    import mergeflow.sweep as sweep

    root, base, experts, _ = inputs
    merges, kept = [], {}
    write_point, cached = sweep.write_point, sweep_stage._cached

    def counted(method, params, *args, **kwargs):
        merges.append((method, params["steps"]))
        write_point(method, params, *args, **kwargs)

    def kept_where(path, write):  # the cached file of the point merged just now
        before = len(merges)
        cached(path, write)
        if len(merges) > before:
            kept[merges[-1]] = path
        return path

    monkeypatch.setattr(sweep, "write_point", counted)
    monkeypatch.setattr(sweep_stage, "_cached", kept_where)
    monkeypatch.setitem(search.AUTO_GRIDS, "adamerging", {"steps": [2, 4]})  # two short learning runs
    argv = ["merge", "--method", "auto", "--candidates", "adamerging", "--base", base, "--out", str(tmp_path / "a"),
            "--device", "cpu", "--tune", str(root / "data.yaml"), "--store", str(tmp_path / "s")]
    for expert in experts:
        argv += ["--expert", expert]
    assert main(argv) == 0
    # one learning run per point, whatever the rungs: the early rungs' cut to a tenth of the steps (2 and 4 both
    # to 1: one point), then each survivor's full run at the last rung
    assert sorted(merges) == [("adamerging", 1), ("adamerging", 2), ("adamerging", 4)]
    out = capsys.readouterr().out
    chosen = next(line for line in out.splitlines() if "<- chosen" in line).split()[0]
    manifest = json.loads((tmp_path / "a" / "mergeflow.json").read_text())
    assert manifest["method"] == "adamerging" and chosen.startswith("adamerging(")
    searched = load_file(str(kept[("adamerging", manifest["params"]["steps"])]))
    written = {}
    for shard in sorted((tmp_path / "a").glob("*.safetensors")):
        written.update(load_file(str(shard)))
    assert written.keys() == searched.keys() and all(written[k].equal(searched[k]) for k in written)


def test_auto_needs_validation_data_and_names_bad_candidates(inputs, tmp_path, capsys):
    root, base, experts, _ = inputs
    common = ["merge", "--base", base, "--out", str(tmp_path / "x"), "--expert", experts[0], "--expert", experts[1]]
    assert main([*common, "--method", "auto"]) != 0
    assert "--tune" in capsys.readouterr().err
    assert main([*common, "--method", "auto", "--candidates", "nonsense", "--tune", str(root / "data.yaml")]) != 0
    assert "nonsense" in capsys.readouterr().err
    assert main([*common, "--method", "ties", "--budget", "10"]) != 0
    assert "--method auto" in capsys.readouterr().err
