"""`method: auto`'s search space: every applicable method's grid points as candidates (`AUTO_GRIDS`, declared in
each method's file), and the point an early rung scores for a candidate: a fraction of an iterative method's step
counts, a data-aware one's statistics on that share of the examples (`at_fidelity`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mergeflow.errors import ConfigError
from mergeflow.methods import METHODS
from mergeflow.sweep import grid_points

# Per method, the grid `auto` searches (declared in the method's file: `MergeMethod.search_grid`, else its sweep
# grid), in the registry's order; methods with neither are not searchable.
AUTO_GRIDS: dict[str, dict[str, list[Any]]] = {
    name: dict(cls.search_grid if cls.search_grid is not None else cls.sweep_grid)
    for name, cls in METHODS.items() if cls.search_grid is not None or cls.sweep_grid is not None}


@dataclass(frozen=True)
class Candidate:
    method: str
    params: dict[str, Any]
    statistics: float = 1.0  # the share of the experts' statistics examples a data-aware point reads (early rungs)
    resume_from: int = 0  # validation examples per task this point is already scored on (an earlier rung): kept

    @property
    def name(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.method}({shown})" if shown else self.method


def applicable_methods(data_aware: bool, learned: bool = False) -> list[str]:
    """Methods `auto` may search: data-free always, data-aware when statistics can be computed, learned ones
    (AdaMerging, DOGE AM) when an objective can be made from the tasks' unlabeled validation inputs."""
    from mergeflow.methods import method_class
    from mergeflow.methods.data_aware import DataAwareMethod

    out = []
    for method in AUTO_GRIDS:
        cls = method_class(method)
        if (cls.needs_objective and not learned) or (issubclass(cls, DataAwareMethod) and not data_aware):
            continue
        out.append(method)
    return out


def candidates(methods: Sequence[str] | None = None, grids: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
               data_aware: bool = True, learned: bool = True) -> list[Candidate]:
    """One candidate per grid point of each method (`methods`: default every applicable one that learns nothing,
    in `AUTO_GRIDS` order, a learned one only when named; `grids`: per-method overrides of `AUTO_GRIDS`), each
    validated. `learned`: whether an objective can be made from the tasks' validation inputs."""
    from mergeflow.methods import method_class

    grids = dict(grids or {})
    allowed = applicable_methods(data_aware, learned)
    chosen = list(methods) if methods else [m for m in allowed if not method_class(m).needs_objective
                                            and method_class(m).searched_by_default]
    for method in [*chosen, *grids]:
        if method not in allowed:
            if method not in AUTO_GRIDS:
                why = "it has no grid for auto"
            elif method_class(method).needs_objective:
                why = "it learns from unlabeled inputs, and no task inputs are given"
            else:
                why = "it needs statistics, which these inputs do not give"
            raise ConfigError(f"search.methods: {method!r} cannot be searched ({why}); searchable: "
                              f"{', '.join(allowed)}")
    out: list[Candidate] = []
    for method in chosen:
        grid = grids.get(method, AUTO_GRIDS[method])
        points = grid_points(method, grid) if grid else [{}]
        out += [Candidate(method, point) for point in points]
    if not out:
        raise ConfigError("search: no candidate to search")
    return out


DEFAULT_FIDELITY = 0.1  # search.fidelity's default: the share of an iterative method's counts before the last rung


def rung_fidelity(rung: int, rungs: int, fidelity: float) -> float:
    """The fraction of an iterative method's counts rung `rung` of `rungs` runs: `fidelity` before the last (one
    reduced merge, cached, serves every early rung), then the full counts, continued from the reduced run's end."""
    return fidelity if rung < rungs - 1 else 1.0


def at_fidelity(candidate: Candidate, fraction: float) -> Candidate:
    """The point scored for `candidate` at `fraction` of its method's counts, a data-aware one on statistics of
    that share of the examples (the candidate itself at full)."""
    from mergeflow.methods.data_aware import DataAwareMethod

    share = fraction if issubclass(METHODS[candidate.method], DataAwareMethod) and fraction < 1 else 1.0
    return Candidate(candidate.method, METHODS[candidate.method].at_fidelity(candidate.params, fraction), share)


def fidelity_label(point: Candidate, candidate: Candidate) -> str:
    """What `point` ran of `candidate`: its counts ("steps 100/400"), the share of the statistics' examples it read
    ("statistics 25%"), or "full"."""
    counts = METHODS[candidate.method].fidelity_label(point.params, candidate.params)
    if point.statistics >= 1:
        return counts
    share = f"statistics {100 * point.statistics:g}%"
    return share if counts == "full" else f"{counts}, {share}"
