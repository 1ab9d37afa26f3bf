"""Ctrl-C in the middle of the LLM-scale run (issue 32): the same inputs, stack and config as `llm_scale.py`, the
`mergeflow run` started in its own process group, and SIGINT sent to that group (what a terminal's Ctrl-C sends)
`--after` seconds into the first stage whose name starts with `--stage` (default: `merge-`, a merge streaming
shards to S3; `evaluate-` stops a 1 B forward pass). Prints the seconds from the signal to the command's exit, its
exit status, whether any process of its group outlived it, and what it left: half-written merges or `.partial-`
keys in S3, MLflow runs still open. Exit status 1 when it took over 10 s or left anything.

    .venv/bin/python benchmarks/llm_interrupt.py --size 1b                       # Ctrl-C 20 s into a merge
    .venv/bin/python benchmarks/llm_interrupt.py --size 1b --stage evaluate- --after 30
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_models import ensure_inputs  # noqa: E402
from llm_scale import BUCKET, on_stack  # noqa: E402
from stack_harness import EXE, ROOT, kill_group, mlflow_report, start, store_report  # noqa: E402

LIMIT_S = 10.0


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def interrupt(size: str, workdir: Path, stage: str, after: float, seed: int = 0) -> int:
    paths = ensure_inputs(workdir / "inputs", size, seed)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rundir = workdir / f"interrupt-{stamp}"
    rundir.mkdir(parents=True)
    prefix = f"llm-scale/{size}-interrupt-{stamp}"
    with on_stack(size, paths, rundir, prefix) as (env, config, _):
        log = rundir / "run.log"
        run = start([EXE, "run", str(config)], log, env, rundir)
        try:
            marker = f"] start {stage}"
            while marker not in log.read_text(errors="replace"):
                if run.poll() is not None:
                    raise RuntimeError(f"the run exited ({run.returncode}) before a stage {stage}*; see {log}")
                time.sleep(0.2)
            line = next(x for x in log.read_text(errors="replace").splitlines() if marker in x)
            print(f"  {line.strip()[-100:]}; Ctrl-C in {after:.0f} s", flush=True)
            time.sleep(after)
            sent = time.monotonic()
            os.killpg(run.pid, signal.SIGINT)
            try:
                code = run.wait(timeout=120)
            except Exception:  # noqa: BLE001 - still running after 2 minutes: reported as such
                code = None
            seconds = time.monotonic() - sent
            time.sleep(1.0)
            survivors = group_alive(run.pid)
        finally:
            kill_group(run)
        store = store_report(env, BUCKET, f"{prefix}/store/")
        mlflow = mlflow_report(env["MLFLOW_TRACKING_URI"], f"llm-scale-{size}")
    print(f"\n== llm_interrupt --size {size}: Ctrl-C {after:.0f} s into {line.split('start ')[-1].strip()}")
    print(f"exit status {code} {seconds:.1f} s after the signal; processes of its group left: {survivors}")
    print(f"store: {len(store['merged'])} merged with a manifest, half-written merges {store['incomplete']}, "
          f"partial keys {store['partial']}; MLflow runs still open: {mlflow['open']}")
    problems = [text for bad, text in ((code is None or seconds > LIMIT_S, f"exit took {seconds:.1f} s"),
                                       (survivors, "processes outlived the command"),
                                       (store["incomplete"] or store["partial"], "half-written objects"),
                                       (mlflow["open"], "open MLflow runs")) if bad]
    print("checks: " + ("all passed" if not problems else "FAILED: " + "; ".join(problems)), flush=True)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--stage", default="merge-", help="prefix of the stage name to interrupt")
    parser.add_argument("--after", type=float, default=20.0, help="seconds into that stage")
    parser.add_argument("--workdir", help="default: benchmarks/out/llm_scale/<size>")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or ROOT / "benchmarks" / "out" / "llm_scale" / args.size).resolve()
    return interrupt(args.size, workdir, args.stage, args.after)


if __name__ == "__main__":
    sys.exit(main())
