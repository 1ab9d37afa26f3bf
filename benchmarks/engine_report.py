"""What engine_speed.py prints: the table of one input (every round per tool, time ratios of the fastest rounds,
the output comparisons), Mergeflow's throughput with the 7B x 8 projection, and the issue's goals as met/missed."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine_peers import GB

TOOLS = ("mergeflow", "mergekit", "fusionbench")
TOOL_NAMES = {"mergeflow": "Mergeflow", "mergekit": "mergekit 0.1.5", "fusionbench": "FusionBench 0.2.33"}
VIT_GOALS = {"ta": (6.0, 1.5), "ties": (20.0, 2.5), "dare": (8.0, None)}  # Mergeflow: seconds, peak GB
# mergekit's methods that Mergeflow mirrors: on both inputs, >= 2x mergekit's speed at <= half its peak RSS
MERGEKIT_GOALS = ("slerp", "dare_ties")
PROJECTION_BYTES = 7e9 * 2 * (8 + 1)  # 7B parameters in bf16, base + 8 experts
Inputs = Any  # engine_speed.Inputs (imported there, not here: no cycle)


@dataclass(frozen=True)
class Run:
    wall_s: float = 0.0
    peak: int = 0  # bytes
    error: str | None = None  # failed, or not run: why


def best(runs: list[Run]) -> Run | None:
    """The fastest successful round's wall time with the largest peak RSS of all rounds; None if none ran."""
    ok = [r for r in runs if r.error is None]
    return Run(min(r.wall_s for r in ok), max(r.peak for r in ok)) if ok else None


def print_table(inputs: Inputs, args: argparse.Namespace, runs: dict, comparisons: dict) -> None:
    rounds = [""] if args.rounds == 1 else [f" r{i + 1}" for i in range(args.rounds)]
    header = ["method"] + [f"{TOOL_NAMES[t]}{r}" for t in args.tools for r in rounds]
    peers = [t for t in ("mergekit", "fusionbench") if t in args.tools and "mergeflow" in args.tools]
    header += [f"{TOOL_NAMES[t].split()[0]}/Mergeflow (time)" for t in peers]
    header += [f"Mergeflow vs {TOOL_NAMES[t].split()[0]}" for t in peers]
    slerp = (f" (slerp: the base and the first expert, {inputs.nbytes('slerp') / GB:.2f} GB)"
             if "slerp" in args.methods else "")
    print(f"\n### {inputs.title}\n\nwall s / peak RSS GB of the whole command (GB = 1e9 bytes); "
          f"{inputs.nbytes() / GB:.2f} GB of input{slerp}\n")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for method in args.methods:
        cells = [method]
        for tool in args.tools:
            cells += [r.error or f"{r.wall_s:.1f} s / {r.peak / GB:.2f} GB" for r in runs[method, tool]]
        ours = best(runs[method, "mergeflow"]) if "mergeflow" in args.tools else None
        for tool in peers:
            theirs = best(runs[method, tool])
            cells.append(f"{theirs.wall_s / ours.wall_s:.1f}x" if ours and theirs and ours.wall_s else "-")
        cells += [comparisons.get((method, tool), "-") for tool in peers]
        print("| " + " | ".join(cells) + " |")
    print("\nRatios: the fastest round of each. Errors: the largest over tensors of ||a - b|| / ||b|| (a: Mergeflow, "
          "b: the peer) and, for the update, ||a - b|| / ||b - theta_0||. TIES: mergekit trims each tensor to its own "
          "top 20%, Mergeflow and FusionBench the whole task vector (global top-k). DARE: every tool draws its own "
          "random masks (mergekit also rescales by the L1 norm, not 1/(1-p)). mergekit computes in float32 "
          "(`dtype: float32`) as Mergeflow does; FusionBench in the inputs' dtype" +
          (" (bf16 arithmetic here)." if inputs.dtype == "bfloat16" else ".") +
          (" SLERP (t 0.5, the base and the first expert) and DARE-TIES (keep 0.5 per tensor, L1 rescale, elected "
           "signs, weight 1, lambda 0.3, normalize off) are mergekit's methods, run with the same values by both; "
           "FusionBench's code loaded here has neither." if {"slerp", "dare_ties"} & set(args.methods) else ""))


def print_throughput(inputs: Inputs, args: argparse.Namespace, runs: dict) -> None:
    """Mergeflow's input GB/s on the Llama inputs and the time it projects for 7B x 8 experts in bf16."""
    for method in args.methods:
        ours = best(runs[method, "mergeflow"])
        if ours:
            rate = inputs.nbytes(method) / GB / ours.wall_s
            print(f"Mergeflow {method} throughput: {rate:.3g} GB of input per second; projection (not measured) for "
                  f"7B x 8 experts, bf16 ({PROJECTION_BYTES / GB:.0f} GB of input) at this rate: "
                  f"{PROJECTION_BYTES / GB / rate:.0f} s")


def goal_lines(inputs: Inputs, args: argparse.Namespace, runs: dict) -> list[str]:
    """The issue's goals, each as 'goal ...: met|MISSED (measured)' or 'not measured (why)'."""
    lines = []

    def check(text: str, tools: dict[str, Run | None], met: Callable[..., bool], measured: Callable[..., str]) -> None:
        if missing := [t for t, r in tools.items() if r is None]:
            why = "; ".join(f"{TOOL_NAMES[t]}: {reason(runs.get((method, t)))}" for t in missing)
            lines.append(f"goal {inputs.kind} {method}: {text}: not measured ({why})")
            return
        verdict = "met" if met(*tools.values()) else "MISSED"
        lines.append(f"goal {inputs.kind} {method}: {text}: {verdict} ({measured(*tools.values())})")

    for method in args.methods:
        ours, mergekit, fusionbench = (best(runs.get((method, t), [])) for t in TOOLS)
        if method in MERGEKIT_GOALS:
            check(">= 2x faster than mergekit", {"mergeflow": ours, "mergekit": mergekit},
                  lambda a, b: b.wall_s >= 2 * a.wall_s,
                  lambda a, b: f"{b.wall_s / a.wall_s:.1f}x: {a.wall_s:.1f} vs {b.wall_s:.1f} s")
            check("peak RSS <= half mergekit's", {"mergeflow": ours, "mergekit": mergekit},
                  lambda a, b: 2 * a.peak <= b.peak,
                  lambda a, b: f"{a.peak / GB:.2f} vs {b.peak / GB:.2f} GB, {a.peak / b.peak:.2f} of it")
        elif inputs.kind == "vit":
            seconds, peak_gb = VIT_GOALS[method]
            check(f"Mergeflow <= {seconds:g} s", {"mergeflow": ours}, lambda a: a.wall_s <= seconds,
                  lambda a: f"{a.wall_s:.1f} s")
            if peak_gb:
                check(f"Mergeflow peak RSS <= {peak_gb:g} GB", {"mergeflow": ours},
                      lambda a: a.peak / GB <= peak_gb, lambda a: f"{a.peak / GB:.2f} GB")
            check(">= 2x faster than mergekit", {"mergeflow": ours, "mergekit": mergekit},
                  lambda a, b: b.wall_s >= 2 * a.wall_s, lambda a, b: f"{b.wall_s / a.wall_s:.1f}x")
            check("faster than FusionBench", {"mergeflow": ours, "fusionbench": fusionbench},
                  lambda a, b: b.wall_s > a.wall_s, lambda a, b: f"{b.wall_s / a.wall_s:.1f}x")
        else:
            check("Mergeflow peak RSS <= mergekit's", {"mergeflow": ours, "mergekit": mergekit},
                  lambda a, b: a.peak <= b.peak, lambda a, b: f"{a.peak / GB:.2f} vs {b.peak / GB:.2f} GB")
            check("Mergeflow time <= mergekit's", {"mergeflow": ours, "mergekit": mergekit},
                  lambda a, b: a.wall_s <= b.wall_s, lambda a, b: f"{a.wall_s:.1f} vs {b.wall_s:.1f} s")
    return lines


def reason(runs: list[Run] | None) -> str:
    """Why a tool has no measurement: its first error, or that it was not asked for."""
    return next((r.error for r in runs or [] if r.error), "not in --tools")
