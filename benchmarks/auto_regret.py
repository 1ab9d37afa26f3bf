"""Regret of `method: auto`: how far the point it chose on validation falls, on test, below the best point of its own
search space, for the search as it runs (racing) and for plain successive halving, beside the best single-method
`--tune` on the same validation data and the cost of each in scored examples.

    python benchmarks/auto_regret.py configs/demo-auto.yaml      # after `mergeflow run configs/demo-auto.yaml`

Everything is read from the run's store: the experts (never trained here), statistics, subspaces, every point's
merged weights (content cache) and its validation scores (sweep records with each example's credit), so the two
searches replay without merging again; what a replay needs and the run did not score is scored the same way. Test
scores are computed here for every candidate (this benchmark's reference only: no choice reads them) and kept in
benchmarks/out/auto_regret/<run>-test.json. Scores are normalised by each expert's accuracy on its own task.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mergeflow.config import AUTO, MergeSpec, load_run_config  # noqa: E402
from mergeflow.hygiene import held_out_accuracy  # noqa: E402
from mergeflow.plan import compile_plan  # noqa: E402
from mergeflow.search import Candidate  # noqa: E402
from mergeflow.stages.data import fit_head, prepare_dataset  # noqa: E402
from mergeflow.stages.evaluate import evaluate_stored, score_model  # noqa: E402
from mergeflow.stages.fetch import materialize_pretrained  # noqa: E402
from mergeflow.stages import sparsify, statistics, subspace  # noqa: E402
from mergeflow.stages.finetune import expert_location  # noqa: E402
from mergeflow.stages.in_process import InProcessRun  # noqa: E402
from mergeflow.stages.search import search  # noqa: E402
from mergeflow.stages.store import Store  # noqa: E402
from mergeflow.stages.sweep import sweep_weights  # noqa: E402
from mergeflow.sweep import score_point  # noqa: E402


def stored_run(config, device: str) -> InProcessRun:
    """The run's plan in process, its inputs read from the store (SystemExit naming an expert that is missing),
    walked through what its search reads (statistics, subspaces, the experts' validation scores)."""
    store = Store.of(config.storage)
    base = materialize_pretrained(config.model, store)
    outputs = {"pretrained": base}
    for t in config.tasks:
        dataset = prepare_dataset(t.name, config.data, store, t.dataset, config.model.family)
        head = fit_head(t.name, base, dataset, config.evaluation, store, device, t.head)
        uri = t.expert or expert_location(t.name, base, dataset, head, config.finetune, store.root)
        if not store.exists(uri):
            raise SystemExit(f"{uri}: expert {t.name} is not stored; run `mergeflow run {config.name}` first")
        outputs.update({f"expert:{t.name}": store.checkpoint_ref(uri), f"dataset:{t.name}": dataset,
                        f"head:{t.name}": head})
    run = InProcessRun(config, store, device, compile_plan(config), outputs)
    label = next(label for label, spec in run.labelled.items() if spec.method == AUTO)
    run.walk(run.plan.node(f"chosen:{label}").inputs)  # the overlap check among them
    return run


def test_norm_avg(run: InProcessRun, candidate: Candidate, expert_test: dict[str, float], kept: dict,
                  kept_file: Path) -> float:
    """The candidate's average normalised test accuracy (kept in `kept` by candidate name, and in `kept_file` as
    soon as it is scored: an interrupted benchmark resumes)."""
    if candidate.name not in kept:
        spec = MergeSpec(method=candidate.method, params=candidate.params)
        unlabeled = (run.tasks, "validation", run.evaluation) if _learns(spec) else None  # as it was searched
        weights = sweep_weights(spec.method, spec.params, run.base, run.experts, run.store, run.device,
                                subspace.read_by(spec, run), sparsify.pass_of(spec, run),
                                statistics.read_by(spec, run), unlabeled)
        accuracy, _ = score_model(run.base, run.tasks, run.evaluation, run.store, run.device, "test", None, weights)
        kept[candidate.name] = sum(accuracy[t] / expert_test[t] for t in accuracy) / len(accuracy)
        partial = kept_file.with_suffix(".partial")
        partial.write_text(json.dumps(kept, indent=1, sort_keys=True))
        partial.replace(kept_file)
    return kept[candidate.name]


def _learns(spec: MergeSpec) -> bool:
    from mergeflow.methods import method_class

    return method_class(spec.method).needs_objective


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a run config with a `method: auto` merge, already run")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    config = load_run_config(args.config)
    spec = next((m for m in config.merges if m.method == AUTO), None)
    if spec is None:
        raise SystemExit(f"{args.config}: no merge with method: auto")
    settings, tuning = spec.search_settings(), config.tuning
    run = stored_run(config, args.device)
    out = ROOT / "benchmarks" / "out" / "auto_regret"
    out.mkdir(parents=True, exist_ok=True)
    kept_file = out / f"{config.name}-test.json"
    kept = json.loads(kept_file.read_text()) if kept_file.exists() else {}
    expert_test = {n: evaluate_stored(e, run.base, {n: run.tasks[n]}, run.evaluation, run.store, run.device)[0][n]
                   for n, e in run.experts.items()}
    expert_val, leaked = run.expert_scores(), run.leaked()

    searches = {}
    halving = settings.model_copy(update={"confidence": 0.5 + 1e-9, "extend_edges": False})
    variants = [("auto (racing, as it runs)", settings, leaked), ("successive halving only", halving, leaked)]
    if leaked:  # what the search would choose reading the leaked examples too
        variants.append(("auto, leaked examples read", settings, {}))
    for name, variant, held in variants:
        started = time.perf_counter()
        result = search(variant, tuning, expert_val, run, held)
        searches[name] = (result, time.perf_counter() - started)
    pool = settings.candidates()
    space = {c.name: c for c in pool}
    for result, _ in searches.values():
        space.update({e.candidate.name: e.candidate for e in result.entries})
    started = time.perf_counter()
    tests = {name: test_norm_avg(run, c, expert_test, kept, kept_file) for name, c in space.items()}
    best = max(tests, key=tests.get)

    tuned = {}  # --tune per method: its grid scored on the full validation cap, the best point's test score
    for method in dict.fromkeys(c.method for c in pool):
        points = [c for c in pool if c.method == method]
        scores = [score_point(c.params, held_out_accuracy(run.score(MergeSpec(method=c.method, params=c.params),
                                                                    tuning.max_examples), leaked),
                              expert_val, tuning.rule, tuning.floor).score for c in points]
        tuned[method] = points[max(range(len(points)), key=scores.__getitem__)]
    best_tune = max(tuned.values(), key=lambda c: tests[c.name])

    print(f"{config.name}: {len(pool)} candidates; best on test: {best} ({100 * tests[best]:.1f} normalized); "
          f"test scores of {len(tests)} points in {time.perf_counter() - started:.0f} s")
    print("| search | chosen | test norm. avg | regret (points) | examples scored per task |")
    print("|---|---|---:|---:|---:|")
    for name, (result, _) in searches.items():
        chosen = result.winner.name
        print(f"| {name} | {chosen} | {100 * tests[chosen]:.1f} | {100 * (tests[best] - tests[chosen]):.1f} | "
              f"{result.examples_scored} |")
    grid = sum(c.method == "task_arithmetic" for c in pool)
    print(f"| best single-method --tune | {best_tune.name} | {100 * tests[best_tune.name]:.1f} | "
          f"{100 * (tests[best] - tests[best_tune.name]):.1f} | {len(pool) * tuning.max_examples} (every grid) |")
    print(f"(a Task Arithmetic sweep over its {grid}-point grid scores {grid * tuning.max_examples} examples per task)")
    (out / f"{config.name}.json").write_text(json.dumps({
        "best": {"candidate": best, "test_norm_avg": tests[best]},
        "searches": {name: {"chosen": r.winner.name, "test_norm_avg": tests[r.winner.name],
                            "regret": tests[best] - tests[r.winner.name], "examples_scored": r.examples_scored}
                     for name, (r, _) in searches.items()},
        "tune": {m: {"chosen": c.name, "test_norm_avg": tests[c.name]} for m, c in tuned.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
