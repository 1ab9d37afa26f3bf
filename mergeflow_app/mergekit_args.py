"""`mergeflow merge --config mergekit.yml` and `--print-mergekit`: mergekit's YAML in and out on the command line."""

from __future__ import annotations

import argparse

from mergeflow.errors import MergeflowError


def apply_mergekit_config(args: argparse.Namespace) -> None:
    """Fill the method, parameters, base, experts and output dtype of `args` from the mergekit config in
    `args.config` (which these may not be given beside); checks the rest of the command line."""
    if args.config:
        clash = [flag for flag, value in (("--method", args.method), ("--base", args.base), ("--expert", args.expert),
                                          ("--param", args.param), ("--tune", args.tune), ("--data", args.data))
                 if value]
        if clash:
            raise MergeflowError(f"--config {args.config} gives the method, its parameters, the base and the experts: "
                                 f"drop {', '.join(clash)}")
        from mergeflow.mergekit_config import read_mergekit

        merge = read_mergekit(args.config)
        args.method, args.base, args.expert, args.mergekit_params = merge.method, merge.base, merge.expert_uris, \
            merge.params
        args.out_dtype = args.out_dtype or merge.out_dtype
    missing = [flag for flag, value in (("--method", args.method), ("--base", args.base), ("--expert", args.expert))
               if not value]
    if missing:
        raise MergeflowError(f"merge: give {', '.join(missing)} (or --config MERGEKIT_YAML)")
    if not args.out and not args.print_mergekit:
        raise MergeflowError("merge: give --out (the output directory)")


def print_mergekit(args: argparse.Namespace, params: dict) -> int:
    """Print the mergekit YAML of the merge on the command line (nothing is merged); 1 where none exists."""
    from mergeflow.methods import build_method
    from mergeflow.mergekit_config import to_mergekit

    method = build_method(args.method, params)
    text = to_mergekit(method.name, method.params.model_dump(), args.base, list(args.expert), args.out_dtype)
    if text is None:
        print(f"mergekit has no equivalent of Mergeflow's {args.method!r} with these parameters")
        return 1
    print(text, end="")
    return 0
