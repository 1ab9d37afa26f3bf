"""The runs of mergekit_parity.py: mergekit 0.1.5 through its `mergekit-yaml` command in a worker process per input
(or a process per merge), and Mergeflow through `merge_checkpoints`, on the same files with the same values."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from engine_peers import MERGEKIT_MAIN

if TYPE_CHECKING:
    from mergekit_parity import Case

def load(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file or of the safetensors files in a directory."""
    out = {}
    for file in [path] if path.is_file() else sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})
    return out


# One process runs mergekit's own CLI command (`mergekit.scripts.run_yaml.main`, the `mergekit-yaml` entry point,
# with engine_peers.py's torchvision stand-in) once per job line read from stdin: the ~7 s import of mergekit and
# transformers is paid once instead of per merge. Each job passes `--random-seed`, which reseeds every generator
# (transformers' set_seed) before that merge. Its logs go to stderr; one line per job on the original stdout.
MERGEKIT_WORKER = """
import json, os, sys, traceback
sys.modules['torchvision'] = None
reply = os.fdopen(os.dup(1), 'w')
os.dup2(2, 1)
from mergekit.scripts.run_yaml import main
for line in sys.stdin:
    try:
        main(json.loads(line), prog_name='mergekit-yaml', standalone_mode=False)
        reply.write('0\\n')
    except Exception:
        traceback.print_exc()
        reply.write('1\\n')
    reply.flush()
"""


class Mergekit:
    """mergekit 0.1.5's CLI: a worker process running one merge per job, or (`fresh`) a new process per merge
    exactly as engine_peers.py runs it."""

    def __init__(self, peers: Path, log: Path, fresh: bool) -> None:
        self.env = {**os.environ, "PYTHONPATH": str(peers), "HF_HUB_OFFLINE": "1"}
        self.log, self.fresh, self.worker = log, fresh, None
        log.unlink(missing_ok=True)

    def args(self, case: Case, base: Path, experts: list[Path], out: Path, seed: int) -> list[str]:
        config = out.with_name(out.name + ".json")
        config.write_text(json.dumps(case.mergekit_config(base, experts), indent=2))
        shutil.rmtree(out, ignore_errors=True)
        return [str(config), str(out), "--no-copy-tokenizer", "--random-seed", str(seed)]

    def run(self, case: Case, base: Path, experts: list[Path], out: Path, seed: int) -> float:
        args = self.args(case, base, experts, out, seed)
        started = time.perf_counter()
        if self.fresh:
            with self.log.open("a") as log:
                done = subprocess.run([sys.executable, "-c", MERGEKIT_MAIN, *args], stdout=log,
                                      stderr=subprocess.STDOUT, env=self.env)
            failed = done.returncode != 0
        else:
            if self.worker is None:
                self.log_file = self.log.open("a")
                self.worker = subprocess.Popen([sys.executable, "-c", MERGEKIT_WORKER], stdin=subprocess.PIPE,
                                               stdout=subprocess.PIPE, stderr=self.log_file, env=self.env,
                                               text=True)
            self.worker.stdin.write(json.dumps(args) + "\n")
            self.worker.stdin.flush()
            failed = self.worker.stdout.readline().strip() != "0"
        if failed:
            tail = self.log.read_text().strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"mergekit failed on {case.label} (log: {self.log}): {tail[0][:300]}")
        return time.perf_counter() - started

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stdin.close()
            self.worker.wait(timeout=60)
            self.log_file.close()
            self.worker = None


def run_mergeflow(case: Case, base: Path, experts: list[Path], out: Path, seed: int) -> float:
    from mergeflow.merge import merge_checkpoints

    method, params = case.mergeflow_params(seed)
    started = time.perf_counter()
    merge_checkpoints(method, str(base), [str(e) for e in experts], str(out), params, device="cpu",
                      overwrite=True)
    return time.perf_counter() - started
