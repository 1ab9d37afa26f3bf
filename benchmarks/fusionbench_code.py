"""FusionBench 0.2.33's own implementations of TSV-M, Iso-C, Iso-CTS and WUDI, and the TIES, DARE and state-dict
arithmetic utilities its Task Arithmetic, TIES and DARE algorithms use, for parity checks and benchmarks.

The wheel is fetched from the package index (`pip download --no-deps`, never installed, never a dependency of
Mergeflow) into `benchmarks/out/fusion-bench/` and these modules are loaded from its files as they are.
The package's `__init__` pulls in Lightning, Hydra and more; the few names these files import from it (a timing
context, type aliases, base classes used only by the classes around the functions) are given light stand-ins.
"""

from __future__ import annotations

import contextlib
import importlib.util
import subprocess
import sys
import types
import warnings
import zipfile
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file

VERSION = "0.2.33"
WHEEL = f"fusion_bench-{VERSION}-py3-none-any.whl"
ROOT = Path(__file__).resolve().parent / "out" / "fusion-bench"
FILES = {
    "tsvm": "fusion_bench/method/task_singular_vector/utils/TSVM_utils.py",
    "iso": "fusion_bench/method/isotropic_merging/iso_utils.py",
    "wudi": "fusion_bench/method/wudi/wudi.py",
    "ties": "fusion_bench/method/ties_merging/ties_merging_utils.py",
    "dare": "fusion_bench/method/dare/utils.py",
    "arithmetic": "fusion_bench/utils/state_dict_arithmetic.py",
}


def wheel_path() -> Path:
    """The downloaded wheel (fetched on first use)."""
    wheel = ROOT / WHEEL
    if not wheel.exists():
        ROOT.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                               "--disable-pip-version-check", "-d", str(ROOT), f"fusion-bench=={VERSION}"],
                              capture_output=True, text=True)
        if done.returncode != 0 or not wheel.exists():
            raise RuntimeError(f"could not download fusion-bench=={VERSION} from the package index:\n{done.stderr}")
    return wheel


def _stand_ins() -> dict[str, types.ModuleType]:
    def module(name: str, **names: Any) -> types.ModuleType:
        mod = types.ModuleType(name)
        mod.__dict__.update(names)
        return mod

    def base(name: str) -> type:  # BaseAlgorithm, BaseModelPool, LightningFabricMixin: only for unused classes
        return type(name, (), {"__init__": lambda self, *args, **kwargs: None})

    def sub(a: dict, b: dict) -> dict:
        return {k: a[k] - b[k] for k in a}

    def add(a: dict, b: dict) -> dict:
        return {k: a[k] + b[k] for k in a}

    return {
        "fusion_bench": module("fusion_bench", BaseAlgorithm=base("BaseAlgorithm"), BaseModelPool=base("BaseModelPool"),
                               auto_register_config=lambda cls: cls),
        "fusion_bench.utils": module("fusion_bench.utils", timeit_context=lambda *a, **k: contextlib.nullcontext()),
        "fusion_bench.utils.type": module("fusion_bench.utils.type", StateDictType=dict, BoolStateDictType=dict,
                                          TorchModelType=TypeVar("TorchModelType")),
        "fusion_bench.utils.state_dict_arithmetic": module("fusion_bench.utils.state_dict_arithmetic",
                                                           state_dict_add=add, state_dict_sub=sub),
        "fusion_bench.mixins": module("fusion_bench.mixins", LightningFabricMixin=base("LightningFabricMixin")),
    }


def load(which: str) -> types.ModuleType:
    """FusionBench's module `which` (a key of FILES), executed from the wheel's file."""
    source = zipfile.ZipFile(wheel_path()).read(FILES[which]).decode()
    stand_ins = _stand_ins()
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        spec = importlib.util.spec_from_loader(f"fusionbench_{which}", loader=None)
        mod = importlib.util.module_from_spec(spec)
        mod.__package__ = FILES[which].rsplit("/", 1)[0].replace("/", ".")  # relative imports reach the stand-ins
        with warnings.catch_warnings():  # __package__ is not the spec's parent: Python says so with an ImportWarning
            warnings.simplefilter("ignore", ImportWarning)
            exec(compile(source, f"{WHEEL}/{FILES[which]}", "exec"), mod.__dict__)
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    return mod


def load_model(path: Path) -> dict[str, torch.Tensor]:
    """A whole model as a state dict: one safetensors file, or every shard of a model directory."""
    state: dict[str, torch.Tensor] = {}
    for file in [path] if path.is_file() else sorted(path.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


def merge_as_algorithms(method: str, base: Path, experts: list[Path], scaling: float, density: float,
                        drop: float) -> dict[str, torch.Tensor]:
    """FusionBench's TaskArithmeticAlgorithm / TiesMergingAlgorithm / DareTaskArithmetic `run` ("ta", "ties",
    "dare"), step by step, on
    state dicts (its model pool would give modules), with its own functions; the merge ends in the pretrained
    model's tensors, as `load_state_dict` puts it there."""
    arithmetic = load("arithmetic")
    pretrained = load_model(base)
    if method == "ta":
        task_vector = None
        for path in experts:
            model = load_model(path)
            tv = arithmetic.state_dict_sub(model, pretrained)
            task_vector = tv if task_vector is None else arithmetic.state_dict_add(task_vector, tv)
        task_vector = arithmetic.state_dict_mul(task_vector, scaling, keep_dtype_when_zero=True)
        merged = arithmetic.state_dict_add(pretrained, task_vector)
    elif method == "ties":
        ties = load("ties")
        ft_checks = [load_model(path) for path in experts]
        flat_ft = torch.vstack([ties.state_dict_to_vector(check, []) for check in ft_checks])
        flat_ptm = ties.state_dict_to_vector(pretrained, [])
        merged_tv = ties.ties_merging(flat_ft - flat_ptm, reset_thresh=density * 100, merge_func="sum")
        merged = ties.vector_to_state_dict(flat_ptm + scaling * merged_tv, pretrained, remove_keys=[])
    else:
        dare = load("dare")
        torch.manual_seed(0)
        # trainable_only=False: plain tensors do not require grad; every parameter of its modules does
        task_vectors = [dare.module_sub_(load_model(path), pretrained, trainable_only=False) for path in experts]
        for tv in task_vectors:
            dare.module_random_drop_(tv, drop, rescale=True)
        merged = {}
        for name, delta in arithmetic.state_dict_sum(task_vectors).items():
            merged[name] = pretrained[name].add_(delta * scaling)
    for name, tensor in merged.items():
        if tensor is not pretrained[name]:
            pretrained[name].copy_(tensor)
    return pretrained
