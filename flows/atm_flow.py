"""The ATM flow (alternating tuning and merging): K rounds in which every task is fine-tuned briefly from the
current model (fanned out, one task per expert) and the round's updates are merged into the next model.

Variant from_pretrained starts at theta_0 and splits the fine-tuning budget over the rounds; variant posthoc
refines a merge of the same config (run first by the merge flow as a subflow, reusing everything stored) with
rounds on each task's validation split. Each round's model is stored (URI + sha256), scored on test, and
recorded: MLflow metrics with step = round on the parent run, and a Prefect table of accuracy by round.
"""

from typing import Any

from prefect import flow

from flows.merge_flow import merge_flow, submit_task_inputs, tracked_run
from mergeflow.config import RunConfig
from mergeflow.evaluate import format_results_table
from mergeflow.stages.refs import ObjectRef
from tasks.atm import atm_finetune, atm_merge, record_atm_round, record_atm_table
from tasks.evaluate import evaluate
from tasks.fetch import fetch_pretrained
from tasks.finetune import finetune_expert


@flow(name="mergeflow-atm", log_prints=True)
def atm_flow(config: RunConfig) -> dict[str, Any]:
    """ATM on the config's tasks; returns per-round models and test accuracy."""
    if config.atm is None:
        raise ValueError("the ATM flow needs an `atm` section in the config")
    start_summary = merge_flow(config.model_copy(update={"name": f"{config.name}-start"})) \
        if config.atm.variant == "posthoc" else None
    return tracked_run(config, lambda parent: _rounds(config, parent, start_summary))


def _rounds(config: RunConfig, parent: str, start_summary: dict[str, Any] | None) -> dict[str, Any]:
    atm, storage, device = config.atm, config.storage, config.device
    names = [t.name for t in config.tasks]
    base = fetch_pretrained(config.model, storage)
    datasets, heads = submit_task_inputs(config, base)
    eval_inputs = {n: (datasets[n].result(), heads[n].result()) for n in names}
    experts = {n: finetune_expert.submit(n, base, *eval_inputs[n], config.finetune, storage, device,
                                         config.tracking, parent) for n in names}  # the normalisers (stored)
    expert_acc = {n: evaluate.submit(f"expert-{n}", f.result(), base, {n: eval_inputs[n]}, config.evaluation,
                                     storage, device, config.tracking, parent).result()[n]
                  for n, f in experts.items()}
    steps = atm.steps_per_round or max(1, config.finetune.steps // atm.rounds)
    current = ObjectRef(**start_summary["merged"][atm.start]) if start_summary else None
    rows: dict[str, dict[str, float]] = {}
    if current is not None:
        rows[f"{atm.start} (start)"] = start_summary["accuracy"][atm.start]
    rounds = []
    for k in range(1, atm.rounds + 1):
        settings = config.finetune.model_copy(update={
            "steps": steps, "seed": config.finetune.seed + k, "schedule": atm.schedule,
            "warmup_steps": min(config.finetune.warmup_steps, steps // 4)})
        futures = {n: atm_finetune.submit(k, n, base, current, *eval_inputs[n], settings, atm.round_split(),
                                          storage, device, config.tracking, parent) for n in names}
        round_experts = {n: f.result() for n, f in futures.items()}
        current = atm_merge(k, atm.merge, base, current, round_experts, config.name, storage, device)
        accuracy = evaluate(f"atm-round-{k}", current, base, eval_inputs, config.evaluation, storage, device,
                            config.tracking, parent)
        rows[f"atm round {k}"] = accuracy
        record_atm_round(k, current, accuracy, expert_acc, config.tracking, parent)
        rounds.append({"round": k, "uri": current.uri, "sha256": current.sha256, "accuracy": accuracy})
        print(f"ATM round {k}/{atm.rounds}: avg {100 * sum(accuracy.values()) / len(accuracy):.1f}% -> {current.uri}")
    table = format_results_table(rows, names, expert_acc)
    record_atm_table(rows, names, table, config.name, config.tracking, parent)
    return {"run": config.name, "mlflow_run_id": parent, "variant": atm.variant, "rounds": rounds, "table": table,
            "steps_per_round": steps, "expert_accuracy": expert_acc}


def run_atm_file(path: str) -> dict[str, Any]:
    from tasks.runners import task_runner_for
    from mergeflow.config import load_run_config

    config = load_run_config(path)
    summary = atm_flow.with_options(task_runner=task_runner_for(config))(config)
    print("\nATM (" + summary["variant"] + f", {summary['steps_per_round']} steps per task per round), test "
          "accuracy (%):\n\n" + summary["table"])
    return summary
