"""`mergeflow merge --tune`: a method's coefficients, or with `--method auto` the method too, chosen on each
task's validation split before the merge (`mergeflow.merge_data`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from mergeflow.errors import MergeflowError


def tuned_params(args: argparse.Namespace, params: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """`--tune DATA_CONFIG`: pick the method's coefficients on validation data (grid from --grid or the default)."""
    from mergeflow.config import MergeDataConfig, load_yaml_model
    from mergeflow.merge_data import load_task_inputs, tune
    from mergeflow.content_cache import ContentCache
    from mergeflow.sweep import default_grid
    from mergeflow.task_vectors import resolve_device

    grid = {}
    for item in args.grid:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise MergeflowError(f"--grid {item!r}: expected key=v1,v2,...")
        grid[key.strip()] = [yaml.safe_load(v) for v in values.split(",")]
    grid = grid or default_grid(args.method)
    config = load_yaml_model(args.tune, MergeDataConfig)
    cache = ContentCache()
    tasks = load_task_inputs(config, len(args.expert), cache, options, splits=("validation",))
    chosen, scores = tune(args.method, params, grid, args.base, args.expert, config, tasks, cache, options,
                          device=resolve_device(args.device))
    for score in scores:
        mark = "  <- chosen" if score.params == chosen else ""
        print(f"  {json.dumps({k: score.params[k] for k in grid})}: validation avg {100 * score.avg:.1f}%, "
              f"norm. avg {100 * score.norm_avg:.1f}%{mark}")
    return chosen


def searched_method(args: argparse.Namespace, options: dict[str, Any]
                    ) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
    """`--method auto --tune DATA_CONFIG`: the best method and coefficients by successive halving on validation
    data (`mergeflow.search`), with the leaderboard printed; and, for a winner that needed a merge of its own (DOGE,
    data-aware, learned), its merged tensors as the search computed them, for the merge to write (not redo)."""
    import tempfile
    from mergeflow.config import MergeDataConfig, SearchConfig, load_yaml_model
    from mergeflow.content_cache import ContentCache
    from mergeflow.merge_data import load_task_inputs, search
    from mergeflow.task_vectors import resolve_device

    if not args.tune:
        raise MergeflowError("--method auto searches on validation data: give --tune DATA_CONFIG")
    if args.param or args.grid or args.statistics or args.data:
        raise MergeflowError("--method auto takes no --param, --grid, --statistics or --data (narrow the search with "
                             "--candidates; --tune's data config gives the statistics)")
    settings = SearchConfig(methods=[m.strip() for m in args.candidates.split(",")] if args.candidates else None,
                            max_evaluations=args.budget, max_seconds=args.max_seconds)
    settings.candidates()  # a bad method name fails before any data is read
    config = load_yaml_model(args.tune, MergeDataConfig)
    cache = ContentCache()
    tasks = load_task_inputs(config, len(args.expert), cache, options,
                             splits=sorted({"validation", config.statistics.split}))
    # merges kept for later rungs sit in the content cache's folder (MERGEFLOW_CACHE), which has room for models
    with tempfile.TemporaryDirectory(prefix="search-", dir=cache.root) as merged_dir:
        result = search(settings, args.base, args.expert, config, tasks, cache, options,
                        device=resolve_device(args.device), progress=True, merged_dir=Path(merged_dir))
        winner = _kept_merge(Path(merged_dir), result.winner.method, result.winner.params)
    print(f"search: {result.rungs_done} of {result.rungs_planned} rungs, {result.examples_scored} validation "
          f"examples per task, {result.seconds:.1f} s" + (f"; stopped early: {result.stopped}" if result.stopped
                                                          else ""))
    for row in result.leaderboard():
        scores = ", ".join(f"{k}: {v}" for k, v in row.items() if k.startswith("rung "))
        print(f"  {row['candidate']:48s} {scores}{'  <- chosen' if row['chosen'] else ''}")
    if result.winner.method != "average" and _is_data_aware(result.winner.method):
        args.data = args.tune  # the winner's statistics: the same cached files
    return result.winner.method, dict(result.winner.params), winner


def _kept_merge(merged_dir: Path, method: str, params: dict[str, Any]) -> dict[str, Any] | None:
    from safetensors.torch import load_file

    from mergeflow.merge_data import kept_merge_name

    path = merged_dir / kept_merge_name(method, params)
    return load_file(str(path)) if path.exists() else None


def _is_data_aware(method: str) -> bool:
    from mergeflow.methods import method_class
    from mergeflow.methods.data_aware import DataAwareMethod

    return issubclass(method_class(method), DataAwareMethod)
