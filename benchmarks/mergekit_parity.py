"""Mergeflow's mergekit-compatible methods beside mergekit 0.1.5 itself, on the same inputs, tensor by tensor.

For every mergekit method Mergeflow mirrors (task_arithmetic -> task_arithmetic_weighted, ties -> ties_per_tensor,
dare_ties, dare_linear, della, della_linear, breadcrumbs, breadcrumbs_ties, slerp, model_stock) and a few YAML cases
(per-model weights, densities, gammas and epsilons that differ per expert; layer gradients; name filters), both
tools merge the same checkpoints with every parameter given explicitly (their defaults differ):
  mergekit   `mergekit-yaml CONFIG OUT --no-copy-tokenizer --random-seed S` (mergekit 0.1.5 as engine_peers.py
             installs and runs it), `dtype: float32`, `out_dtype: float32`; one worker process per input runs the
             command once per merge, sparing mergekit's ~7 s import each time (--fresh-processes: a process per
             merge; the outputs, random masks included, are the same bit for bit)
  Mergeflow  `merge_checkpoints(method, base, experts, out, params, device="cpu")`, in this process
Inputs, generated from a seed into benchmarks/out/mergekit_parity/ (git-ignored) and reused while their recorded
description matches:
  llama  a tiny LlamaForCausalLM (Hugging Face names, config.json mergekit knows), fp32: 4 layers, hidden 128,
         intermediate 256, vocab 1000; base + 3 experts
  vit    vit_models.py's ViT-B/32-shaped visual tower (open_clip names), fp32, 2 blocks; base + 3 experts. mergekit
         has no ViT/open_clip architecture: given a config.json with an unknown one it infers the layout from the
         tensor names (layers: `transformer.resblocks.N.`, everything else a loose weight at t = 0)
Task vectors: a component shared by the experts plus one of each expert's own, so that sign elections, Model
Stock's angles and SLERP's angles are not trivial.

Per case: max |a - b| (a: Mergeflow, b: mergekit), the relative error ||a - b|| / ||b - theta_0|| over all float
tensors, whether the outputs are bit-identical (same names, dtypes and values), and why not where they are not:
  top-k methods (ties, breadcrumbs*)  every entry that differs is checked to sit where two |tau| of an expert tie at
                                      one of its cuts (each tool's sort breaks such ties its own way)
  slerp, model_stock                  each tool's error against the same merge computed in float64
  random methods (dare_*, della*)     the masks differ (mergekit: torch's global generator; Mergeflow: generators
                                      seeded per expert and tensor): the fraction of entries each tool changed
                                      against 1 - prod_i (1 - p_i); on the Llama inputs, the relative error of the
                                      two tools' means over --seeds seeds beside the same figure between two disjoint
                                      sets of Mergeflow seeds (the noise floor); one-expert rows give the fraction kept
The layer-depth convention is read back from the task_arithmetic gradient case: per tensor, the t at which weight
[1, 0.3] was evaluated by each tool, against mergekit's (layer i of L at i/(L-1), everything else at 0).

    python benchmarks/mergekit_parity.py                    # both inputs, every case (~5 min on 2 cores)
    python benchmarks/mergekit_parity.py --inputs llama --seeds 2
    python benchmarks/mergekit_parity.py --cases slerp,ta-gradient

Exits 1 if a run fails or a case is not explained: a deterministic difference above 1e-5 (relative) that is not a
tie at a top-k cut, a SLERP/Model Stock result more than twice as far from the float64 merge as mergekit's, changed
fractions more than 6 binomial standard deviations from the expected one, or means further apart than 1.25x the
noise floor.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing mergeflow

from engine_peers import OUT, ensure_mergekit  # noqa: E402
from parity_checks import (convention, depth_readback, exact_errors, expected_changed, mean_of,  # noqa: E402
                           rel_error, tied_cuts)
from parity_inputs import EXPERTS, llama_set, vit_set  # noqa: E402
from parity_runs import Mergekit, load, run_mergeflow  # noqa: E402

ROUNDING = 1e-5  # a deterministic case's relative error above this is a disagreement


# ---------------------------------------------------------------------------------------------------- inputs


MERGEFLOW_NAMES = {"task_arithmetic": "task_arithmetic_weighted", "ties": "ties_per_tensor"}
RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}
MAGNITUDE = {"ties", "breadcrumbs", "breadcrumbs_ties"}  # deterministic top-k cuts by |tau|


@dataclass(frozen=True)
class Case:
    """One merge, in mergekit's terms: `shared` are its global parameters (lambda, normalize, rescale, t,
    filter_wise), `per_model` one dict of weight/density/gamma/epsilon per expert."""

    label: str
    method: str  # mergekit's name
    shared: dict[str, Any]
    per_model: tuple[dict[str, Any], ...] = ()
    experts: int = EXPERTS
    seed: int = 0
    vit: bool = True  # also run on the ViT inputs (the slower ones are run on the Llama inputs only)

    @property
    def random(self) -> bool:
        return self.method in RANDOM

    def mergekit_config(self, base: Path, experts: list[Path]) -> dict[str, Any]:
        models = [{"model": str(e), **({"parameters": dict(p)} if p else {})}
                  for e, p in zip(experts, self.per_model or [{}] * len(experts))]
        if self.method == "slerp":  # mergekit's slerp merges the base and one other model, both listed
            models = [{"model": str(base)}, *models]
        return {"merge_method": self.method, "base_model": str(base), "models": models,
                "parameters": dict(self.shared), "dtype": "float32", "out_dtype": "float32"}

    def mergeflow_params(self, seed: int) -> tuple[str, dict[str, Any]]:
        params = {("scaling" if k == "lambda" else k): v for k, v in self.shared.items()}
        if self.per_model:
            params["per_expert"] = [dict(p) for p in self.per_model]
        if self.random:
            params["seed"] = seed
        return MERGEFLOW_NAMES.get(self.method, self.method), params


def uniform(experts: int = EXPERTS, **values: Any) -> tuple[dict[str, Any], ...]:
    return tuple(dict(values) for _ in range(experts))


GTA = {"lambda": 1.0, "normalize": False, "rescale": False}
CASES = [
    # one row per method, the same values for every expert
    Case("task_arithmetic", "task_arithmetic", {"lambda": 0.3, "normalize": False}, uniform(weight=1.0)),
    Case("ties", "ties", {**GTA, "normalize": True}, uniform(weight=1.0, density=0.2)),
    Case("dare_ties", "dare_ties", {**GTA, "rescale": True}, uniform(weight=1.0, density=0.5)),
    Case("dare_linear", "dare_linear", {**GTA, "lambda": 0.5, "rescale": True}, uniform(weight=1.0, density=0.5)),
    Case("della", "della", {**GTA, "normalize": True, "rescale": True},
         uniform(weight=1.0, density=0.5, epsilon=0.15)),
    Case("della_linear", "della_linear", {**GTA, "lambda": 0.5, "rescale": True},
         uniform(weight=1.0, density=0.5, epsilon=0.15)),
    Case("breadcrumbs", "breadcrumbs", {**GTA, "lambda": 0.5}, uniform(weight=1.0, density=0.9, gamma=0.01)),
    Case("breadcrumbs_ties", "breadcrumbs_ties", {**GTA, "normalize": True},
         uniform(weight=1.0, density=0.9, gamma=0.01)),
    Case("slerp", "slerp", {"t": 0.5}, experts=1),
    Case("model_stock", "model_stock", {"filter_wise": False}),
    Case("model_stock filter_wise", "model_stock", {"filter_wise": True}),
    # YAML cases: values per expert, gradients, filters
    Case("ta per-model weights, normalize", "task_arithmetic", {"lambda": 1.0, "normalize": True},
         ({"weight": 1.0}, {"weight": 0.5}, {"weight": 0.25})),
    Case("ta-gradient weight [1, 0.3]", "task_arithmetic", {"lambda": 1.0, "normalize": False},
         uniform(weight=[1.0, 0.3])),
    Case("ta-filter self_attn 0.3 / mlp 0.5 / 0.7", "task_arithmetic", {"lambda": 1.0, "normalize": False},
         uniform(weight=[{"filter": "self_attn", "value": 0.3}, {"filter": "mlp", "value": 0.5}, {"value": 0.7}])),
    Case("ties per-model weight/density", "ties", {**GTA, "normalize": True},
         ({"weight": 1.0, "density": 0.7}, {"weight": 0.5, "density": 0.4}, {"weight": 0.25, "density": 0.2})),
    Case("ties density filter+gradient", "ties", {**GTA, "normalize": True},
         uniform(weight=1.0, density=[{"filter": "mlp", "value": [0.2, 0.8]}, {"value": 0.5}]), vit=False),
    Case("breadcrumbs_ties per-model density/gamma", "breadcrumbs_ties", {**GTA, "normalize": True},
         ({"weight": 1.0, "density": 0.9, "gamma": 0.01}, {"weight": 0.6, "density": 0.8, "gamma": 0.05},
          {"weight": 0.3, "density": 0.7, "gamma": 0.0}), vit=False),
    Case("slerp-gradient t [0, 0.5, 1]", "slerp", {"t": [0.0, 0.5, 1.0]}, experts=1),
    Case("slerp filter + gradients", "slerp",
         {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
                {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]}, {"value": 0.5}]}, experts=1),
    Case("dare_ties per-model weight/density", "dare_ties", {**GTA, "rescale": True},
         ({"weight": 1.0, "density": 0.8}, {"weight": 0.7, "density": 0.5}, {"weight": 0.4, "density": 0.3})),
    Case("della per-model density/epsilon", "della", {**GTA, "normalize": True, "rescale": True},
         ({"weight": 1.0, "density": 0.6, "epsilon": 0.1}, {"weight": 1.0, "density": 0.5, "epsilon": 0.2},
          {"weight": 1.0, "density": 0.4, "epsilon": 0.05}), vit=False),
    # kept fraction vs density: one expert, no rescale, so an entry moves iff it is kept
    Case("kept: dare_linear d=0.3 (1 expert)", "dare_linear", GTA, uniform(1, weight=1.0, density=0.3), experts=1),
    Case("kept: della_linear d=0.4 eps=0.15 (1 expert)", "della_linear", GTA,
         uniform(1, weight=1.0, density=0.4, epsilon=0.15), experts=1, vit=False),
]
MEANS = ("dare_ties", "dare_linear", "della", "della_linear")  # cases whose means over seeds are compared
DEPTH_CASE = "ta-gradient weight [1, 0.3]"


# ---------------------------------------------------------------------------------------------------- runs


# ---------------------------------------------------------------------------------------------------- comparison


@dataclass
class Row:
    inputs: str
    case: Case
    max_abs: float = math.nan
    rel: float = math.nan
    identical: bool = False
    worst: str = ""  # the tensor with the largest |a - b|
    changed: tuple[float, float] = (math.nan, math.nan)  # fraction of entries != theta_0: Mergeflow, mergekit
    entries: int = 0  # float entries compared
    expected_changed: float | None = None
    means: tuple[int, float, float] | None = None  # seeds, rel. err of the means, Mergeflow-vs-Mergeflow floor
    ties: tuple[int, int, bool] | None = None  # entries that differ, of all; whether all sit at tied cuts
    exact: tuple[float, float] | None = None  # rel. err of Mergeflow, of mergekit against a float64 computation
    problem: str | None = None
    seconds: tuple[float, float] = (0.0, 0.0)


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], theta0: dict[str, torch.Tensor],
            row: Row) -> None:
    """Fills the row's max |a - b|, relative error over all float tensors, identity and changed fractions."""
    if a.keys() != b.keys():
        row.problem = (f"tensor names differ: only Mergeflow {sorted(a.keys() - b.keys())[:3]}, only mergekit "
                       f"{sorted(b.keys() - a.keys())[:3]}")
        return
    identical, max_abs, worst, diff2, moved2 = True, 0.0, "", 0.0, 0.0
    changed_a = changed_b = total = 0
    for name in sorted(a):
        x, y = a[name], b[name]
        if x.shape != y.shape:
            row.problem = f"shapes differ: {name} {tuple(x.shape)} vs {tuple(y.shape)}"
            return
        identical &= x.dtype == y.dtype and torch.equal(x, y)
        if not y.is_floating_point():
            continue
        z = theta0[name]
        x64, y64, z64 = x.double(), y.double(), z.double()
        d = (x64 - y64).abs()
        if d.numel() and float(d.max()) > max_abs:
            max_abs, worst = float(d.max()), name
        diff2 += float((d * d).sum())
        moved2 += float(((y64 - z64) ** 2).sum())
        changed_a += int((x != z).sum())
        changed_b += int((y != z).sum())
        total += z.numel()
    row.identical, row.max_abs, row.worst = identical, max_abs, worst
    row.rel = math.sqrt(diff2 / moved2) if moved2 else (0.0 if diff2 == 0 else math.inf)
    row.changed, row.entries = (changed_a / total, changed_b / total), total


def run_set(kind: str, base: Path, experts: list[Path], cases: list[Case], args: argparse.Namespace,
            mergekit: Mergekit, scratch: Path) -> tuple[list[Row], list[str]]:
    theta0 = {k: v for k, v in load(base).items() if v.is_floating_point()}
    expert_tensors = [load(e) for e in experts]
    rows, notes = [], []
    scratch.mkdir(parents=True, exist_ok=True)
    for case in cases:
        row = Row(kind, case)
        chosen, chosen_tensors = experts[:case.experts], expert_tensors[:case.experts]
        a_out, b_out = scratch / "mergeflow", scratch / "mergekit"
        try:
            t_a = run_mergeflow(case, base, chosen, a_out, case.seed)
            t_b = mergekit.run(case, base, chosen, b_out, case.seed)
        except Exception as error:  # noqa: BLE001 - reported in the table
            row.problem = f"failed: {str(error).strip().splitlines()[-1][:200]}"
            rows.append(row)
            print(f"{kind} {case.label}: {row.problem}", flush=True)
            continue
        row.seconds = (t_a, t_b)
        a, b = load(a_out), load(b_out)
        compare(a, b, theta0, row)
        if row.problem is None and case.random:
            row.expected_changed = expected_changed(case, theta0, chosen_tensors)
        elif row.problem is None and case.method in MAGNITUDE and not row.identical:
            row.ties = tied_cuts(case, a, b, theta0, chosen_tensors)
        elif row.problem is None and case.method in ("slerp", "model_stock") and not row.identical:
            row.exact = exact_errors(case, a, b, theta0, chosen_tensors)
        if case.label == DEPTH_CASE and row.problem is None:
            ta, tb = (depth_readback(o, theta0, expert_tensors, (1.0, 0.3)) for o in (a, b))
            ref = convention(theta0)
            dev_a = max(abs(ta[n] - ref[n]) for n in ref)
            dev_b = max(abs(tb[n] - ref[n]) for n in ref)
            dev_ab = max(abs(ta[n] - tb[n]) for n in ref)
            layer_ts = sorted({round(v, 4) for v in ref.values()})
            notes.append(f"{kind}: depth read back from `{DEPTH_CASE}` (per tensor, the t with merged - theta_0 = "
                         f"w(t) sum tau): max |t_Mergeflow - t_mergekit| = {dev_ab:.1e}; against the convention "
                         f"(layer i of L at i/(L-1), embeddings/final norm/head at 0; t values {layer_ts}): "
                         f"Mergeflow {dev_a:.1e}, mergekit {dev_b:.1e}")
        if case.label in MEANS and row.problem is None and args.seeds > 1 and kind in args.means_inputs:
            outs_a, outs_b, outs_c = [a], [b], []
            for s in range(1, args.seeds):
                run_mergeflow(case, base, chosen, a_out, s)
                outs_a.append(load(a_out))
                mergekit.run(case, base, chosen, b_out, s)
                outs_b.append(load(b_out))
            for s in range(args.seeds, 2 * args.seeds):  # the floor: Mergeflow against Mergeflow, other seeds
                run_mergeflow(case, base, chosen, a_out, s)
                outs_c.append(load(a_out))
            mean_a, mean_b, mean_c = mean_of(outs_a), mean_of(outs_b), mean_of(outs_c)
            row.means = (args.seeds, rel_error(mean_a, mean_b, theta0), rel_error(mean_a, mean_c, theta0))
        shutil.rmtree(a_out, ignore_errors=True)
        shutil.rmtree(b_out, ignore_errors=True)
        rows.append(row)
        print(f"{kind} {case.label}: max|a-b| {row.max_abs:.2e}, rel {row.rel:.2e}, identical {row.identical}"
              f"{'' if row.problem is None else ' ' + row.problem} ({t_a:.1f} s / {t_b:.1f} s)", flush=True)
    return rows, notes


def reason(row: Row) -> tuple[str, bool]:
    """The row's explanation and whether it is acceptable."""
    case = row.case
    if row.problem:
        return row.problem, False
    if row.identical:
        return "", True
    if case.random:
        a, b = row.changed
        text = (f"random masks differ; changed entries: Mergeflow {a:.4f}, mergekit {b:.4f}, expected "
                f"{row.expected_changed:.4f}")
        p = row.expected_changed  # within 6 binomial standard deviations of the expected fraction
        ok = max(abs(a - p), abs(b - p)) <= 6 * math.sqrt(p * (1 - p) / row.entries)
        if row.means:
            seeds, between, floor = row.means
            text += (f"; means over {seeds} seeds: rel. err {between:.3f} (Mergeflow vs Mergeflow on other seeds: "
                     f"{floor:.3f})")
            ok &= between < 1.25 * floor
        return text, ok
    if row.ties:
        differ, total, explained = row.ties
        return (f"{differ} of {total:,} entries differ, " + (
            "each where two entries of an expert's task vector tie in magnitude at a top-k cut (each tool's sort "
            "breaks the tie its own way)"
            if explained else "NOT all at tied magnitudes")), explained
    if row.exact:  # acceptable: rounding, or Mergeflow within 2x mergekit's own distance from the float64 merge
        err_a, err_b = row.exact
        ok = row.rel <= ROUNDING or err_a <= 2 * err_b + ROUNDING
        text = f"fp32 rounding; against the merge in float64: Mergeflow {err_a:.1e}, mergekit {err_b:.1e}"
        if case.method == "slerp" and not ok:
            text += ("; Mergeflow takes the fp32 norms and dot product of each tensor whole (torch's fp32 "
                     "vector_norm loses ~4e-5 relative at 2.4 M entries), mergekit in chunks of 2^20 entries; "
                     "acos near cos 1 amplifies the error (see README)")
        return text, ok
    return "fp32 rounding", row.rel <= ROUNDING


def print_table(rows: list[Row], titles: dict[str, str]) -> bool:
    ok_all = True
    for kind, title in titles.items():
        print(f"\n### {title}\n")
        print("| case | mergekit -> Mergeflow | max \\|a-b\\| | rel. err | bit-identical | why not / check |")
        print("|---|---|---:|---:|---|---|")
        for row in (r for r in rows if r.inputs == kind):
            text, ok = reason(row)
            ok_all &= ok
            mapping = (f"`{row.case.method}`" if row.case.method not in MERGEFLOW_NAMES else
                       f"`{row.case.method}` -> `{MERGEFLOW_NAMES[row.case.method]}`")
            print(f"| {row.case.label} | {mapping} | {row.max_abs:.1e} | {row.rel:.1e} | "
                  f"{'yes' if row.identical else 'no'} | {text}{'' if ok else ' **(disagrees)**'} |")
    return ok_all


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", default="llama,vit", help="comma-separated: llama, vit")
    parser.add_argument("--cases", default="", help="comma-separated substrings of case labels (default: all)")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per tool for the means of the random methods")
    parser.add_argument("--means-inputs", default="llama", help="inputs on which the means over seeds are taken")
    parser.add_argument("--seed", type=int, default=0, help="the inputs' seed")
    parser.add_argument("--workdir", default=str(OUT / "mergekit_parity"))
    parser.add_argument("--fresh-processes", action="store_true",
                        help="a new mergekit process per merge (as engine_peers.py), not one worker per input")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    workdir = Path(args.workdir).absolute()
    os.environ.setdefault("MERGEFLOW_CACHE", str(workdir / "cache"))
    peers = ensure_mergekit()
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    started = time.perf_counter()
    rows, notes, titles = [], [], {}
    for kind in [k.strip() for k in args.inputs.split(",") if k.strip()]:
        cases = [c for c in CASES if (kind == "llama" or c.vit) and (not wanted or any(w in c.label for w in wanted))]
        base, experts, title = {"llama": llama_set, "vit": vit_set}[kind](workdir / kind, args.seed)
        titles[kind] = title
        mergekit = Mergekit(peers, workdir / f"mergekit-{kind}.log", args.fresh_processes)
        try:
            set_rows, set_notes = run_set(kind, base, experts, cases, args, mergekit, workdir / kind / "scratch")
        finally:
            mergekit.close()
        rows += set_rows
        notes += set_notes
    print(f"\nmergekit 0.1.5 (`mergekit-yaml`, dtype float32, --random-seed; "
          f"{'a process per merge' if args.fresh_processes else 'one worker process per input'}) against Mergeflow "
          f"(`merge_checkpoints`, device cpu); torch {torch.__version__}, {os.cpu_count()} cores; "
          f"{time.perf_counter() - started:.0f} s in all")
    ok = print_table(rows, titles)
    print("\na: Mergeflow, b: mergekit. rel. err = ||a - b|| / ||b - theta_0|| over all float tensors; max |a-b| over "
          "all entries. Changed entries: the fraction of entries != theta_0 (expected: 1 - prod_i (1 - p_i), p_i "
          "each expert's keep probability). Means: relative error between the two tools' means over the seeds, "
          "beside the same figure between two disjoint sets of Mergeflow seeds (the noise floor). Kept rows (one "
          "expert, no rescale): changed entries = the fraction kept, against the density.")
    for note in notes:
        print(f"\n{note}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
