"""The `mergeflow` command: merge checkpoints directly, list methods, convert legacy pickles, run a flow."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mergeflow.errors import MergeflowError


def _parse_params(pairs: Sequence[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise MergeflowError(f"--param {pair!r}: expected key=value")
        params[key.strip()] = yaml.safe_load(value)
    return params


def _storage_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"endpoint_url": args.s3_endpoint} if args.s3_endpoint else {}


def cmd_merge(args: argparse.Namespace) -> int:
    from mergeflow.merge import merge_checkpoints
    from mergeflow_app.tuning import merge_inputs, searched_method, tuned_params

    from mergeflow_app.mergekit_args import apply_mergekit_config, print_mergekit

    apply_mergekit_config(args)
    params, run = getattr(args, "mergekit_params", None) or _parse_params(args.param), None
    if args.print_mergekit:
        return print_mergekit(args, params)
    options = _storage_options(args)
    if args.method == "auto":
        run, args.method, params = searched_method(args, options)
    elif args.candidates or args.budget or args.max_seconds or args.fidelity is not None:
        raise MergeflowError("--candidates, --budget, --max-seconds and --fidelity belong to --method auto")
    elif args.tune:
        run, params = tuned_params(args, params, options)
    if args.as_adapter:
        from mergeflow.checkpoints.lora import merge_adapters

        record = merge_adapters(args.method, params, args.base, args.expert, args.out,
                                storage_options=options, overwrite=args.overwrite)
        print(f"merged {len(args.expert)} LoRA adapters with {args.method} into one adapter at {args.out} "
              f"(rank per module: {min(record['ranks'].values(), default=0)}-{max(record['ranks'].values(), default=0)})")
        return 0
    result = merge_checkpoints(args.method, args.base, args.expert, args.out, params,
                               device=args.device, shard_size=args.shard_size, storage_options=options,
                               overwrite=args.overwrite, progress=True, window=args.window, out_dtype=args.out_dtype,
                               **merge_inputs(args, params, options, run))
    experts = sum(ref.role == "expert" for ref in result.inputs)
    print(f"merged {experts} experts with {result.method} {json.dumps(result.params)} "
          f"in {result.seconds:.1f} s")
    for ref in result.inputs:
        print(f"  {ref.role:10s} {ref.uri}  sha256:{ref.sha256[:16]}")
    print(f"wrote {args.out}:")
    for name, digest in result.files.items():
        print(f"  {name}  sha256:{digest[:16]}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from mergeflow.methods import describe_methods

    described = describe_methods()
    if args.json:
        print(json.dumps(described, indent=2))
        return 0
    for method in described:
        print(f"{method['name']}: {method['summary']}")
        for p in method["params"]:
            bounds = ", ".join(f"{k} {v}" for k, v in p["bounds"].items())
            print(f"  --param {p['name']}=<{p['type']}>  default {p['default']!r}"
                  f"{f' ({bounds})' if bounds else ''}  {p['description']}")
        if not method["params"]:
            print("  (no parameters)")
    print("auto: not a method: the best method and coefficients, searched on validation data (--method auto --tune "
          "DATA, or method: auto in a run config)")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from mergeflow.checkpoints.convert import convert_legacy

    convert_legacy(args.source, args.destination, storage_options=_storage_options(args), overwrite=args.overwrite,
                   kind=args.kind)
    print(f"wrote {args.destination} (loaded {args.source} as a trusted pickle)")
    return 0


def _load_flows() -> None:
    """The flows' imports (Prefect, torch, transformers: seconds), done while a temporary server boots."""
    import flows.atm_flow  # noqa: F401 - imports the merge flow too


def _plan(args: argparse.Namespace) -> int:
    from mergeflow_app.planning import cmd_plan

    return cmd_plan(args)


def cmd_run(args: argparse.Namespace) -> int:
    from mergeflow.config import load_run_config
    from mergeflow_app.prefect_server import prefect_api

    load_run_config(args.config)  # a bad config fails before any server starts
    with prefect_api(meanwhile=_load_flows):
        from flows.merge_flow import run_config_file

        run_config_file(args.config)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from mergeflow.config import load_run_config
    from mergeflow_app.prefect_server import prefect_api

    load_run_config(args.config)
    with prefect_api(meanwhile=_load_flows):
        from flows.merge_flow import run_config_file

        run_config_file(args.config, only_swept=True)
    return 0


def cmd_atm(args: argparse.Namespace) -> int:
    from mergeflow.config import load_run_config
    from mergeflow_app.prefect_server import prefect_api

    load_run_config(args.config)
    with prefect_api(meanwhile=_load_flows):
        from flows.atm_flow import run_atm_file

        run_atm_file(args.config)
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    from tasks.lineage import format_lineage, lineage

    tree = lineage(args.tracking_uri, args.model)
    print(json.dumps(tree, indent=2) if args.json else format_lineage(tree))
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from tasks.lineage import pull

    path = pull(args.tracking_uri, args.model, args.directory)
    print(f"downloaded {args.model} to {path} (every file's sha256 verified)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.deployments import serve
    from mergeflow.config import load_run_config

    serve(load_run_config(args.config), name=args.name, cron=args.cron or None, timezone=args.timezone,
          limit=args.limit, concurrency_limit=args.concurrency_limit, collision_strategy=args.collision_strategy)
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from flows.deployments import deploy
    from mergeflow.config import load_run_config

    deployment_id = deploy(load_run_config(args.config), name=args.name, pool=args.pool, cron=args.cron or None,
                           timezone=args.timezone, source=args.source, concurrency_limit=args.concurrency_limit,
                           collision_strategy=args.collision_strategy)
    print(f"deployment mergeflow-merge/{args.name} ({deployment_id}) on work pool {args.pool!r}; run it with a "
          f"worker: prefect worker start --pool {args.pool} --type process")
    return 0


def cmd_stack(args: argparse.Namespace) -> int:
    from mergeflow_app.stack import stack_command

    return stack_command(args.action, args.state_dir, args.auth, args.viewer)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergeflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    merge = sub.add_parser("merge", help="merge checkpoints directly (no orchestration)")
    merge.add_argument("--config", metavar="MERGEKIT_YAML", help="a mergekit merge config: its method, parameters, "
                       "base and models, with mergekit's meaning (unsupported fields fail naming the field)")
    merge.add_argument("--print-mergekit", action="store_true", help="print the merge's equivalent mergekit YAML and "
                       "exit (nothing is merged)")
    merge.add_argument("--out-dtype", choices=("float32", "float16", "bfloat16"),
                       help="dtype of the merged float tensors (default: the base's; mergekit's out_dtype)")
    merge.add_argument("--method", help="merge method (see `mergeflow methods`), or auto: the best "
                       "method and coefficients, searched on validation data (needs --tune)")
    merge.add_argument("--base", help="pretrained checkpoint: path, file:// or s3:// URI")
    merge.add_argument("--expert", action="append", help="expert checkpoint (repeat per expert)")
    merge.add_argument("--statistics", action="append", metavar="URI",
                       help="statistics file of an expert, for data-aware methods (repeat per expert, same order)")
    merge.add_argument("--data", metavar="YAML",
                       help="task data of data-aware methods: each expert's dataset and head, the model directory "
                            "(see MergeDataConfig); computes missing statistics, builds AdaMerging's objective")
    merge.add_argument("--tune", metavar="YAML", help="pick the method's coefficients on each task's validation "
                       "split first (a data config as for --data); the grid comes from --grid or the default")
    merge.add_argument("--store", default=".mergeflow/store", metavar="ROOT",
                       help="--tune, --data, --method auto: the store their stages keep results in (statistics, "
                            "scores, passes), a flow's `storage.root`: what one computed the other reuses "
                            "(default .mergeflow/store, the flow's default)")
    merge.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                       help="coefficient values for --tune (repeat per parameter)")
    merge.add_argument("--candidates", metavar="M1,M2", help="--method auto: the methods to search (default: every "
                       "applicable one that learns nothing; name adamerging or doge_am to add them: they learn on "
                       "--tune's validation inputs)")
    merge.add_argument("--budget", type=int, metavar="N", help="--method auto: validation examples scored per task "
                       "over all candidates and rungs; the search stops at the last whole rung within it")
    merge.add_argument("--max-seconds", type=float, metavar="S", help="--method auto: start no rung after S seconds")
    merge.add_argument("--fidelity", type=float, metavar="F", help="--method auto: the fraction of an iterative "
                       "method's step counts the rungs before the last run (default 0.1; 1: full counts throughout)")
    merge.add_argument("--out", help="output directory: path, file:// or s3:// URI")
    merge.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="method parameter")
    merge.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    merge.add_argument("--shard-size", default="2GB", help="maximum shard size, e.g. 500MB, 2GB")
    merge.add_argument("--window", default="256MB",
                       help="inputs (as fp32) read ahead of the merge, e.g. 256MB, 1GB: with the tensor being merged, "
                            "this bounds the engine's memory whatever the number of experts (default 256MB)")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing output")
    merge.add_argument("--as-adapter", action="store_true", help="experts are LoRA adapters and the method linear "
                       "(task_arithmetic, average): write the merge as one LoRA adapter, exactly (ranks add up)")
    merge.add_argument("--s3-endpoint", help="S3 endpoint URL (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)")
    merge.set_defaults(func=cmd_merge)

    methods = sub.add_parser("methods", help="list merge methods with their parameters and defaults")
    methods.add_argument("--json", action="store_true")
    methods.set_defaults(func=cmd_methods)

    convert = sub.add_parser("convert", help="convert a TRUSTED legacy pickle (e.g. a whole nn.Module) to safetensors")
    convert.add_argument("source")
    convert.add_argument("destination", help="output .safetensors path or URI")
    convert.add_argument("--overwrite", action="store_true")
    convert.add_argument("--as", dest="kind", choices=("state_dict", "open_clip_visual", "head"), default="state_dict",
                         help="what to write: the whole state dict; the visual tower of an open_clip model or "
                              "task_vectors ImageEncoder (the open_clip family's expert); a task_vectors "
                              "ClassificationHead as a Mergeflow head")
    convert.add_argument("--s3-endpoint")
    convert.set_defaults(func=cmd_convert)

    plan = sub.add_parser("plan", help="print a run's stages before it runs: stored or to run, and expected times")
    plan.add_argument("config", help="path to a run config, e.g. configs/demo.yaml")
    plan.add_argument("--format", choices=("text", "mermaid"), default="text",
                      help="text (default) or a Mermaid flowchart to paste into a page")
    plan.set_defaults(func=_plan)

    run = sub.add_parser("run", help="run the Prefect merge flow on a YAML config")
    run.add_argument("config", help="path to a run config, e.g. configs/demo.yaml")
    run.set_defaults(func=cmd_run)

    sweep = sub.add_parser("sweep", help="tune the config's swept merges on validation data and merge the chosen "
                                          "points (the merges without `sweep:` are left out)")
    sweep.add_argument("config", help="path to a run config whose merges have `sweep:` grids")
    sweep.set_defaults(func=cmd_sweep)

    atm = sub.add_parser("atm", help="run the ATM flow (alternating tuning and merging) on a config with `atm:`")
    atm.add_argument("config", help="path to a run config, e.g. configs/atm.yaml")
    atm.set_defaults(func=cmd_atm)
    default_tracking = os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    lineage = sub.add_parser("lineage", help="print which checkpoints, data and runs built a registered model")
    lineage.add_argument("model", help="MODEL@alias, MODEL/version or MODEL")
    lineage.add_argument("--tracking-uri", default=default_tracking, help="MLflow tracking URI")
    lineage.add_argument("--json", action="store_true")
    lineage.set_defaults(func=cmd_lineage)

    pull = sub.add_parser("pull", help="download a registered merged model and verify its digests")
    pull.add_argument("model", help="MODEL@alias, MODEL/version or MODEL")
    pull.add_argument("directory")
    pull.add_argument("--tracking-uri", default=default_tracking, help="MLflow tracking URI")
    pull.set_defaults(func=cmd_pull)
    for command, helptext in (("serve", "serve the merge flow as a scheduled deployment in this process"),
                              ("deploy", "register the merge flow as a scheduled deployment on a work pool")):
        p = sub.add_parser(command, help=helptext)
        p.add_argument("config", help="run config, e.g. configs/nightly.yaml (the deployment's parameters)")
        p.add_argument("--name", default="nightly", help="deployment name")
        p.add_argument("--cron", default="0 2 * * *", help="schedule ('' for none: triggered runs only)")
        p.add_argument("--timezone", default="UTC", help="IANA time zone of the cron schedule")
        p.add_argument("--concurrency-limit", type=int, default=1, metavar="N",
                       help="runs of the deployment at once, wherever they run (default 1; 0: no limit)")
        p.add_argument("--collision-strategy", choices=("ENQUEUE", "CANCEL_NEW"), default="ENQUEUE",
                       help="a run beyond the limit waits for a slot (ENQUEUE, default) or is cancelled (CANCEL_NEW)")
        if command == "serve":
            p.add_argument("--limit", type=int, help="flow runs this process runs at once")
            p.set_defaults(func=cmd_serve)
        else:
            p.add_argument("--pool", default="mergeflow-process", help="work pool (process type)")
            p.add_argument("--source", default=str(Path.cwd()),
                           help="code location the workers pull: this checkout (default) or a git URL")
            p.set_defaults(func=cmd_deploy)

    stack = sub.add_parser("stack", help="start/stop/inspect a local Prefect + MLflow + S3 stack (no Docker, "
                                          "127.0.0.1 only)")
    stack.add_argument("action", choices=("up", "down", "status", "env"),
                       help="up: start what is not running; down: stop exactly the recorded processes; status: "
                            "health and UI addresses; env: export lines for using the stack")
    stack.add_argument("--state-dir", help="where PIDs, logs, data and credentials live (default "
                                           "MERGEFLOW_STACK_DIR or .mergeflow/stack)")
    stack.add_argument("--auth", action="store_true", default=None,
                       help="up: start every server with authentication (also MERGEFLOW_STACK_AUTH=1); the state "
                            "directory remembers it, and status/env hand out its credentials")
    stack.add_argument("--viewer", action="store_true",
                       help="env: the read-only viewer's credentials (MLflow reader, S3 read/list) instead of the "
                            "runs'")
    stack.set_defaults(func=cmd_stack)
    return parser


STOPPABLE = {"merge", "run", "sweep", "atm"}  # long work that Ctrl-C / SIGTERM stop cooperatively


def _run_command(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except (MergeflowError, FileExistsError, ValueError) as exc:
        print(f"mergeflow: error: {exc}", file=sys.stderr)
        return 2


def return_freed_tensors() -> None:
    """glibc: allocations of 4 MiB or more get their own mapping, so a freed tensor goes back to the system at once.
    By default glibc raises that threshold to the largest block freed (up to 32 MiB) and keeps later tensors in its
    heap, where freed memory stays: a merge's peak RSS then varied from 0.40 to 0.84 GB between identical runs (ViT
    SLERP; 0.55-0.57 GB with this; a 0.37 B Llama 1.10-1.12 GB -> 0.72-0.75 GB; same speed). A user's own
    MALLOC_MMAP_THRESHOLD_ wins."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc


def main(argv: Sequence[str] | None = None) -> int:
    from mergeflow import stopping

    return_freed_tensors()

    args = build_parser().parse_args(argv)
    if args.command not in STOPPABLE:
        return _run_command(args)
    with stopping.stop_on_signals():  # Ctrl-C / SIGTERM: stop after the current step, record it, exit
        try:
            return _run_command(args)
        except BaseException as exc:  # a stop: Stopped, a cancelled flow run, a second Ctrl-C
            if not (stopping.stop_requested() or isinstance(exc, KeyboardInterrupt)):
                raise
            why = stopping.reason() or "interrupted"
            records = ("; the run's MLflow records end KILLED, its Prefect run Cancelled; run the command again "
                       "to resume" if args.command != "merge" else "")
            print(f"mergeflow: stopped ({why}). Nothing is half-written{records}.", file=sys.stderr)
            if "SIGTERM" in why:
                return 143
            return 130 if "SIGINT" in why or isinstance(exc, KeyboardInterrupt) else 75  # 75: try again later


if __name__ == "__main__":
    sys.exit(main())
