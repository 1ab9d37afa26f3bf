"""The `mergeflow` console script, run as a user runs it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mergeflow.checkpoints import open_checkpoint
from mergeflow.merge import merge_state_dicts
from mergeflow.methods import METHODS

EXE = shutil.which("mergeflow", path=str(Path(sys.executable).parent)) or "mergeflow"


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_methods_lists_every_method_with_parameters():
    out = run("methods")
    assert out.returncode == 0, out.stderr
    for name in METHODS:
        assert f"{name}:" in out.stdout
    assert "--param density=<number>  default 0.2" in out.stdout


@pytest.mark.parametrize("method,params", [("average", []), ("task_arithmetic", ["scaling=0.5"]),
                                           ("ties", ["density=0.3", "merge=mean", "scaling=1.0"]),
                                           ("dare", ["drop_rate=0.2", "seed=7"])])
def test_merge_local_and_file_urls(tmp_path, model_files, method, params):
    base_path, expert_paths, base, experts = model_files
    args = ["merge", "--method", method, "--base", base_path, "--expert", f"file://{expert_paths[0]}",
            "--expert", expert_paths[1], "--expert", expert_paths[2], "--out", f"file://{tmp_path}/out",
            "--device", "cpu"]
    for p in params:
        args += ["--param", p]
    out = run(*args)
    assert out.returncode == 0, out.stderr
    assert "model.safetensors" in out.stdout
    typed = {k: v for k, v in (p.split("=") for p in params)}
    typed = {k: (float(v) if k in {"scaling", "density", "drop_rate"} else int(v) if k == "seed" else v)
             for k, v in typed.items()}
    expected = merge_state_dicts(method, base, experts, typed)
    ckpt = open_checkpoint(str(tmp_path / "out"))
    assert all(torch.equal(ckpt.get(k), expected[k]) for k in expected)


def test_merge_errors_are_one_clear_line_and_write_nothing(tmp_path, model_files):
    base_path, expert_paths, _, _ = model_files
    out = run("merge", "--method", "ties", "--base", base_path, "--expert", expert_paths[0],
              "--out", str(tmp_path / "out"), "--param", "k=0.2")
    assert out.returncode == 2 and "invalid parameters" in out.stderr and "k" in out.stderr
    out = run("merge", "--method", "ties", "--base", base_path, "--expert", str(tmp_path / "missing.safetensors"),
              "--out", str(tmp_path / "out"))
    assert out.returncode == 2 and "missing.safetensors" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()


def test_convert_then_merge_a_pickled_module(tmp_path):
    module = torch.nn.Linear(4, 3)
    torch.save(module, tmp_path / "expert.pt")
    torch.save(torch.nn.Linear(4, 3).state_dict(), tmp_path / "base.pt")
    refused = run("merge", "--method", "average", "--base", str(tmp_path / "base.pt"),
                  "--expert", str(tmp_path / "expert.pt"), "--out", str(tmp_path / "out"))
    assert refused.returncode == 2 and "mergeflow convert" in refused.stderr
    converted = run("convert", str(tmp_path / "expert.pt"), str(tmp_path / "expert.safetensors"))
    assert converted.returncode == 0, converted.stderr
    merged = run("merge", "--method", "average", "--base", str(tmp_path / "base.pt"),
                 "--expert", str(tmp_path / "expert.safetensors"), "--out", str(tmp_path / "out"))
    assert merged.returncode == 0, merged.stderr
    assert torch.equal(open_checkpoint(str(tmp_path / "out")).get("weight"), module.weight.detach())
