"""`mergeflow merge --tune`, `--method auto` and `--data`: the plan the flow would run for the same merge, compiled
from the command line's arguments and walked in process over a store (`mergeflow.stages.in_process`): the method's
coefficients, or the method too, chosen on each task's validation split, the statistics and objective a data-aware
or learned method reads, and the merge's inputs as the flow's merge stage reads them."""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from mergeflow.errors import MergeflowError


def stage_run(args: argparse.Namespace, data_config: str, options: dict[str, Any], merge: Any) -> Any:
    """The plan of the command line's merge `merge` (a `MergeSpec`) over `--store`, as an `InProcessRun`; its
    inputs checked before any model runs."""
    from mergeflow.checkpoints import open_checkpoint
    from mergeflow.config import MergeDataConfig, load_yaml_model
    from mergeflow.content_cache import ContentCache
    from mergeflow.stages.in_process import open_run
    from mergeflow.stages.store import Store
    from mergeflow.validation import validate_compatible

    config = load_yaml_model(data_config, MergeDataConfig)
    if not args.overwrite:
        from mergeflow.storage import exists

        if exists(args.out, options):
            raise FileExistsError(f"{args.out} already exists (pass --overwrite to replace it)")
    cache = ContentCache()
    checkpoints = [open_checkpoint(uri, storage_options=options, cache=cache) for uri in (args.base, *args.expert)]
    try:
        validate_compatible(checkpoints[0], checkpoints[1:])
    finally:
        for ckpt in checkpoints:
            ckpt.close()
    return open_run(config, args.base, args.expert, Store(args.store, options, cache), merge, args.device)


def _chosen(run: Any) -> Any:
    """Walk the plan through its merge's choice (the overlap check, the experts' validation scores, every point
    or rung); returns the chosen spec."""
    choice = next(i for i in run.plan.node(f"merge:{run.label}").inputs if i.startswith(("select:", "chosen:")))
    run.walk(["overlap", choice] if "overlap" in {n.id for n in run.plan} else [choice])
    return run.value(choice)


def tuned_params(args: argparse.Namespace, params: dict[str, Any], options: dict[str, Any]
                 ) -> tuple[Any, dict[str, Any]]:
    """`--tune DATA_CONFIG`: the method's coefficients picked on validation data (grid from --grid or the
    default), with every point's scores printed; returns (the run, the chosen parameters)."""
    from mergeflow.config import MergeSpec
    from mergeflow.sweep import default_grid

    grid = {}
    for item in args.grid:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise MergeflowError(f"--grid {item!r}: expected key=v1,v2,...")
        grid[key.strip()] = [yaml.safe_load(v) for v in values.split(",")]
    try:
        spec = MergeSpec(method=args.method, params=params, sweep=grid or default_grid(args.method))
    except ValueError as exc:
        raise MergeflowError(f"--tune {args.method}: {exc}") from None
    run = stage_run(args, args.tune, options, spec)
    return run, dict(_chosen(run).params)


def searched_method(args: argparse.Namespace, options: dict[str, Any]) -> tuple[Any, str, dict[str, Any]]:
    """`--method auto --tune DATA_CONFIG`: the best method and coefficients by successive halving on validation
    data (`mergeflow.search`), with the leaderboard printed; returns (the run, method, parameters)."""
    from mergeflow.config import MergeSpec, SearchConfig

    if not args.tune:
        raise MergeflowError("--method auto searches on validation data: give --tune DATA_CONFIG")
    if args.param or args.grid or args.statistics or args.data:
        raise MergeflowError("--method auto takes no --param, --grid, --statistics or --data (narrow the search with "
                             "--candidates; --tune's data config gives the statistics)")
    settings = SearchConfig(methods=[m.strip() for m in args.candidates.split(",")] if args.candidates else None,
                            max_evaluations=args.budget, max_seconds=args.max_seconds,
                            **({} if args.fidelity is None else {"fidelity": args.fidelity}))
    settings.candidates()  # a bad method name fails before any data is read
    run = stage_run(args, args.tune, options, MergeSpec(method="auto", search=settings))
    chosen = _chosen(run)
    result = run.searches[run.label]
    print(f"search: {result.rungs_done} of {result.rungs_planned} rungs, {result.examples_scored} validation "
          f"examples per task, {result.seconds:.1f} s" + (f"; stopped early: {result.stopped}" if result.stopped
                                                          else ""))
    for row in result.leaderboard():  # each rung's score, with the counts an iterative method ran there
        shown = []
        for key, value in row.items():
            if key.startswith("rung ") and key.endswith("/task)"):
                fidelity = row[f"{key.split(' (')[0]} fidelity"]
                shown.append(f"{key}: {value}" + ("" if fidelity == "full" else f" [{fidelity}]"))
        scores = ", ".join(shown)
        print(f"  {row['candidate']:48s} {scores}{'  <- chosen' if row['chosen'] else ''}")
    return run, chosen.method, dict(chosen.params)


def merge_inputs(args: argparse.Namespace, params: dict[str, Any], options: dict[str, Any], run: Any = None
                 ) -> dict[str, Any]:
    """The `merge_checkpoints` keywords a merge reads from the stages: with `--tune` (its `run`) or `--data`, its
    statistics (unless given with `--statistics`), objective, stored pass and subspaces, and the point a sweep or
    search computed; else the given `--statistics`. Everything cheap is checked first."""
    from mergeflow.config import MergeSpec
    from mergeflow.methods import build_method
    from mergeflow.methods.data_aware import DataAwareMethod

    method = build_method(args.method, params)
    if args.data and run is not None and args.data != args.tune:
        raise MergeflowError("--data and --tune name different data configs: --tune's serves the merge too")
    if args.data and run is None:
        wants_statistics = isinstance(method, DataAwareMethod) and not args.statistics
        if not (wants_statistics or method.needs_objective):
            raise MergeflowError(f"--data: method {args.method!r} reads no task data"
                                 + (" (its statistics were given with --statistics)" if args.statistics else ""))
        run = stage_run(args, args.data, options, MergeSpec(method=args.method, params=params))
    if run is None:
        return {"statistics": args.statistics}
    inputs = run.merge_inputs()
    return {**inputs, "statistics": args.statistics} if args.statistics else inputs
