"""The checks of mergekit_parity.py: what each case should give, computed independently of both tools (keep
probabilities, expected changed fractions, float64 SLERP and Model Stock, the layer depth read back from a
gradient), and the explanations it tests for a difference (ties in magnitude at a top-k cut)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from mergekit_parity import Case

def mean_of(outputs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: sum(o[k].double() for o in outputs) / len(outputs) for k in outputs[0]}


def rel_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], theta0: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b - theta_0|| over all float tensors."""
    diff2 = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in b if b[k].is_floating_point())
    moved2 = sum(float(((b[k].double() - theta0[k].double()) ** 2).sum()) for k in b if b[k].is_floating_point())
    return math.sqrt(diff2 / moved2)


# Written here from mergekit 0.1.5's planner and config code (not from Mergeflow's): the depth t of a tensor and
# the value of a setting (number, gradient, filters) at a tensor.


def convention(names: Iterable[str]) -> dict[str, float]:
    """Layer i of L at i / (L - 1) (1 for a single layer), everything outside the layers (embeddings, final norm,
    head, loose weights) at 0; layers found by the first `.N.` in the name, as mergekit's inference does."""
    found = {n: re.search(r"\.(\d+)\.", n) for n in names}
    layers = 1 + max(int(m.group(1)) for m in found.values() if m)
    return {n: (int(m.group(1)) / (layers - 1) if layers > 1 else 1.0) if m else 0.0 for n, m in found.items()}


def evaluate(setting: Any, name: str, t: float) -> float | None:
    """A number; a gradient interpolated linearly at t; or the value of the first filter contained in `name`."""
    if isinstance(setting, (int, float)):
        return float(setting)
    if isinstance(setting, dict):
        setting = [setting]
    if all(isinstance(v, (int, float)) for v in setting):
        scaled = t * (len(setting) - 1)
        low = int(scaled)
        high, frac = min(len(setting) - 1, low + 1), scaled - low
        return (1 - frac) * setting[low] + frac * setting[high]
    for cond in setting:
        if cond.get("filter") in (None, "*") or cond["filter"] in name:
            return evaluate(cond["value"], name, t)
    return None


def value(case: Case, key: str, expert: int, name: str, t: float) -> float:
    for scope in (case.per_model[expert] if case.per_model else {}, case.shared):
        if key in scope and (found := evaluate(scope[key], name, t)) is not None:
            return found
    raise KeyError(f"{case.label}: no {key} for {name}")


def keep_probabilities(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MagPrune keep probability of each entry: d - eps for the smallest |value| of a row, d + eps for the
    largest, linear in the rank (rows along dim 1; a 1-D tensor is one row)."""
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).double()
    span = (ranks.max(dim=1, keepdim=True).values - ranks.min(dim=1, keepdim=True).values).clamp(min=1)
    return (density - epsilon + 2 * epsilon * ranks / span).reshape(tau.shape)


def expected_changed(case: Case, theta0: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]]) -> float:
    """The expected fraction of entries that move, 1 - prod_i (1 - p_i), p_i each expert's keep probability (its
    density, or DELLA's per-entry one). With a sign election too: the elected sign is that of the sum of the kept
    entries, which at least one of them shares, so an entry moves exactly when some expert keeps it."""
    stay, total = 0.0, 0
    t = convention(theta0)
    for name, z in theta0.items():
        unchanged = torch.ones(z.shape, dtype=torch.float64)
        for i, expert in enumerate(experts):
            d = min(1.0, value(case, "density", i, name, t[name]))
            keep = (torch.full(z.shape, d, dtype=torch.float64) if case.method.startswith("dare") or d >= 1
                    else keep_probabilities(expert[name].double() - z.double(), d,
                                            value(case, "epsilon", i, name, t[name])))
            unchanged *= 1 - keep
        stay += float(unchanged.sum())
        total += z.numel()
    return 1 - stay / total


def tied_cuts(case: Case, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], theta0: dict[str, torch.Tensor],
              experts: list[dict[str, torch.Tensor]]) -> tuple[int, int, bool]:
    """For the top-k methods: how many entries differ, and whether every one of them is where some expert's |tau|
    equals the magnitude at one of its cuts shared by entries on both sides of it (a tie that each tool's sort
    breaks its own way: mergekit's unstable torch.argsort/sort, Mergeflow's stable sort in index order)."""
    t = convention(theta0)
    differ, total, explained = 0, 0, True
    for name, z in theta0.items():
        total += z.numel()
        where = (a[name] != b[name]).reshape(-1).nonzero().reshape(-1)
        if not len(where):
            continue
        differ += len(where)
        tied = torch.zeros(z.numel(), dtype=torch.bool)
        for i, expert in enumerate(experts):
            magnitude = (expert[name] - z).reshape(-1).abs()
            n, ordered = magnitude.numel(), torch.sort(magnitude).values
            density = value(case, "density", i, name, t[name])
            if density >= 1:
                continue
            if case.method == "ties":
                cuts = [n - max(1, int(density * n))]
            else:
                kept, top = int(density * n), int(value(case, "gamma", i, name, t[name]) * n)
                low = max(0, n - kept - top)
                cuts = [low, low + kept]
            for cut in cuts:
                if 0 < cut < n and ordered[cut - 1] == ordered[cut]:
                    tied |= magnitude == ordered[cut]
        explained &= bool(tied[where].all())
    return differ, total, explained


def slerp64(t: float, v0: torch.Tensor, v1: torch.Tensor, threshold: float = 0.9995) -> torch.Tensor:
    a, b = v0.double().reshape(-1), v1.double().reshape(-1)
    dot = float((a / a.norm()) @ (b / b.norm()))
    dot = max(-1.0, min(1.0, dot))
    if abs(dot) > threshold:
        return (1 - t) * v0.double() + t * v1.double()
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) * v0.double() + math.sin(t * theta) * v1.double()) / math.sin(theta)


def model_stock64(w0: torch.Tensor, ws: list[torch.Tensor], filter_wise: bool) -> torch.Tensor:
    """Model Stock in float64: t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of the task vectors
    (per row of the last axis with filter_wise), theta = t mean_i theta_i + (1 - t) theta_0."""
    rows = (lambda w: w.double().reshape(-1, w.shape[-1])) if filter_wise and w0.dim() > 1 else (
        lambda w: w.double().reshape(1, -1))
    base, offsets = rows(w0), [rows(w) - rows(w0) for w in ws]
    cos = torch.stack([(x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)).clamp(min=1e-6)
                       for i, x in enumerate(offsets) for y in offsets[i + 1:]]).clamp(-1, 1).mean(0)[:, None]
    n = len(ws)
    t = n * cos / (1 + (n - 1) * cos)
    return (t * (sum(rows(w) for w in ws) / n) + (1 - t) * base).reshape(w0.shape)


def exact_errors(case: Case, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                 theta0: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """Each tool's relative error against the same merge computed in float64 (SLERP, Model Stock)."""
    t = convention(theta0)
    if case.method == "slerp":
        exact = {n: slerp64(evaluate(case.shared["t"], n, t[n]), z, experts[0][n]) for n, z in theta0.items()}
    else:
        exact = {n: model_stock64(z, [e[n] for e in experts], case.shared["filter_wise"]) for n, z in theta0.items()}
    return rel_error(a, exact, theta0), rel_error(b, exact, theta0)


def depth_readback(out: dict[str, torch.Tensor], theta0: dict[str, torch.Tensor],
                   experts: list[dict[str, torch.Tensor]], gradient: tuple[float, float]) -> dict[str, float]:
    """Per tensor, the t at which weight [w0, w1] was evaluated: merged - theta_0 = w(t) sum_i tau_i."""
    w0, w1 = gradient
    ts = {}
    for name, z in theta0.items():
        s = sum(e[name].double() - z.double() for e in experts)
        w = float(((out[name].double() - z.double()) * s).sum() / (s * s).sum())
        ts[name] = (w - w0) / (w1 - w0)
    return ts


# ---------------------------------------------------------------------------------------------------- main
